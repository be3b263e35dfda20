"""Where tasks wait: the chain of awaits of a trio task, and the whole task tree.

Built on trio's task introspection (``Task.iter_await_frames``, which follows the
coroutine's ``cr_await`` chain through coroutines and async generators). Each
frame is told by its file, line and function only: never a local value, which
may hold anything (a token, a payload).
"""

from __future__ import annotations

from typing import Any

import trio

#: Frames kept per task (the innermost are kept: that is where it waits).
FRAMES_KEPT = 40
#: Tasks listed in a task tree; the others are counted.
TASKS_KEPT = 2000
#: Characters of a task tree text; beyond it the text is cut and says so.
TEXT_KEPT = 1_000_000


def await_chain(task: trio.lowlevel.Task) -> list[dict[str, Any]]:
    """The frames *task* waits in, outermost first: ``{"function", "file", "line"}``."""
    frames = []
    for frame, line in task.iter_await_frames():
        code = frame.f_code
        frames.append(
            {
                "function": getattr(code, "co_qualname", code.co_name),
                "file": code.co_filename,
                "line": line,
            }
        )
    if len(frames) > FRAMES_KEPT:
        frames = frames[:1] + frames[-(FRAMES_KEPT - 1) :]
    return frames


def describe_chain(frames: list[dict[str, Any]]) -> str:
    """``serve -> handle -> sleep`` (the functions only)."""
    return " -> ".join(frame["function"] for frame in frames)


def task_tree() -> str:
    """Every task of this trio run, as an indented tree with each task's await chain."""
    root = trio.lowlevel.current_root_task()
    lines: list[str] = []
    listed = 0
    left_out = 0
    stack: list[tuple[trio.lowlevel.Task, int]] = [(root, 0)] if root is not None else []
    while stack:
        task, depth = stack.pop()
        if listed >= TASKS_KEPT:
            left_out += 1
        else:
            listed += 1
            indent = "  " * depth
            lines.append(f"{indent}task {_one_line(task.name)}")
            for frame in await_chain(task):
                lines.append(
                    f"{indent}    {frame['function']} at {_one_line(frame['file'])}:{frame['line']}"
                )
        children = [child for nursery in task.child_nurseries for child in nursery.child_tasks]
        stack.extend((child, depth + 1) for child in reversed(children))
    if left_out:
        lines.append(f"... and {left_out} more tasks")
    text = "\n".join(lines) + "\n"
    if len(text) > TEXT_KEPT:
        text = text[:TEXT_KEPT] + f"\n... cut at {TEXT_KEPT} characters\n"
    return text


def _one_line(text: str) -> str:
    return (
        text
        if text.isprintable()
        else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    )
