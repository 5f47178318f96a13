"""Chat history (as gradio's chatbot holds it) <-> the model's messages."""

from __future__ import annotations

import elastic

EMPTY = "(empty answer)"  # shown for an answer with no text; never sent back to the model


def blocks(message) -> tuple[list[str], list[str]]:
    """(texts, file paths) of a chatbot message in any of gradio's content shapes."""
    content = message["content"] if isinstance(message, dict) else message.content
    items = content if isinstance(content, list) else [content]
    texts, files = [], []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text":
            texts.append(item.get("text", ""))
        elif isinstance(item, dict) and ("path" in item or "file" in item):
            file = item.get("file") or item  # gradio_client sends {"file": "<path>"}
            files.append(file if isinstance(file, str) else file["path"])
    return texts, files


def role(message) -> str:
    return message["role"] if isinstance(message, dict) else message.role


def conversation(history: list, question: str, new_image: str | None) -> tuple[list[dict], str | None]:
    """Model messages for ``history`` plus ``question``, and the image they are about.

    The model sees one image: its context starts at the last user turn that brought one
    (a new upload starts a new context; the earlier turns stay on screen).
    """
    turns, image = [], None
    for message in history:
        texts, files = blocks(message)
        text = " ".join(texts)
        if role(message) == "user" and files:
            turns, image = [], files[-1]
        if role(message) == "user" and text:
            turns.append(elastic.user_message(text, with_image=bool(files)))
        elif role(message) == "assistant":
            turns.append({"role": "assistant", "content": [{"type": "text", "text": text.replace(EMPTY, "")}]})
    if new_image is not None:
        turns, image = [], new_image
    turns.append(elastic.user_message(question, with_image=new_image is not None))
    if image is not None and turns[0]["role"] == "user" and turns[0]["content"][0]["type"] != "image":
        turns[0] = elastic.user_message(turns[0]["content"][-1]["text"], with_image=True)  # image sent alone
    return turns, image
