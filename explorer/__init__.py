"""The Gradio app's parts (``app.py`` is only the Space entry: ``demo = build()``, launch).

One concern per file; nothing here computes the algorithm or draws a figure (answers come
from :mod:`elastic`, figures and their HTML from :mod:`viz`):

========================  ===================================================================
``limits``                the bounds on one request or client, and the one-line refusal log
``guards``                input checks, the request-size middleware, the queue's size rule
``sessions``              the server's one model, and each browser tab's plain-data session
``runner``                the one background runner: a generation in a thread, with the time
                          limit and Stop, for chat and Compare alike
``live``                  the text and the trace of an answer while it is being written
``history``               chat history <-> the model's messages
``defaults``              first settings, method lists, the example scenes
``panel``                 the Explore tab's right panel: figures for a trace, live and final
``chat``                  the chat handlers (send, wait, stop, clear)
``compare``               the Compare handlers (run side by side, carry the chat over)
``explore_tab``           the Explore tab's components, by name
``compare_tab``           the Compare tab's components, by name
``layout``                the page (``build``), its events, ``serve``; ``style.css``
========================  ===================================================================

Imports run one way: ``layout`` -> tabs -> handlers -> ``live`` / ``runner`` / ``sessions`` /
``guards`` -> ``limits``; no module imports ``app``.
"""
