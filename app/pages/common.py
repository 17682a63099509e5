"""Helpers shared by the pages: error translation and rendering of prompts."""

from __future__ import annotations

import logging

import gradio as gr

from annotations.errors import AnnotationsError, PermissionDenied

logger = logging.getLogger(__name__)


def guard(fn):
    """Run a handler; domain errors become a visible `gr.Error` (and, for the API, an error
    response) instead of a stack trace."""
    try:
        return fn()
    except PermissionDenied as e:
        raise gr.Error(f"Permission denied: {e}") from None
    except (AnnotationsError, ValueError, KeyError) as e:
        raise gr.Error(str(e).strip("'\"")) from None


def prompt_for_chatbot(messages):
    """Chat messages for a gr.Chatbot; a system prompt is shown as a marked user-side note."""
    shown = []
    for m in messages or []:
        if m["role"] == "system":
            shown.append({"role": "user", "content": f"[system prompt] {m['content']}"})
        else:
            shown.append({"role": m["role"], "content": m["content"]})
    return shown
