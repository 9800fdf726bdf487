"""`subspec-chat` for one reply, driven as a user would: the real app, its real profile and engine
(Textual's Pilot types the prompt and presses enter). Prints one JSON object: how long the start
took (profile and load), the time to the first streamed text and to the whole reply, the reply,
and the live panel's figures as shown (tau, tokens/s, PCIe transfer).

    python benchmarks/app_reply.py [--model DIR] [--method subspec_sd] [--vram-limit-gb 8] [--prompt TEXT]
        [--max-new-tokens N]

Set SUBSPEC_CONFIG_DIR / SUBSPEC_DATA_DIR to keep it off your own profiles and chats. CI runs it
on a CPU on the bundled model in a base install (no dev extra); benchmarks/product_gpu.py runs it
on a GPU. It fails (exit 1) when the app shows no model, no reply or no figures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import sys
import time


async def one_reply(model: str | None, method: str | None, prompt: str, max_new_tokens: int,
                    start_timeout_s: float, vram_limit_gb: float | None = None) -> dict:
    from textual.widgets import Static

    from subspec_tui.app import SubSpecChatApp
    from subspec_tui.widgets.chat_log import AssistantTurn, PromptInput

    started = time.perf_counter()
    app = SubSpecChatApp(model_ref=model, method=method, vram_limit_gb=vram_limit_gb)
    async with app.run_test(size=(140, 40)) as pilot:
        while app.engine_loading and time.perf_counter() - started < start_timeout_s:
            await pilot.pause(0.05)
        if app.engine is None:
            raise SystemExit(f"app_reply: no model loaded: {app.engine_error or 'still loading'}")
        ready_s = time.perf_counter() - started
        app.pending_sampling = dataclasses.replace(app.pending_sampling, max_new_tokens=max_new_tokens)
        chat = app.chat_screen()
        first_text: list[float] = []
        original = AssistantTurn.append

        async def timed_append(self, fragment: str) -> None:
            if not first_text:
                first_text.append(time.perf_counter())
            await original(self, fragment)

        AssistantTurn.append = timed_append  # type: ignore[method-assign]
        box = chat.query_one(PromptInput)
        box.focus()
        box.value = prompt
        sent = time.perf_counter()
        await pilot.press("enter")
        while not _finished(app, chat):
            await pilot.pause(0.01)
        done = time.perf_counter()
        await pilot.pause(0.3)  # the panel redraws at 10 Hz
        AssistantTurn.append = original  # type: ignore[method-assign]
        figures = str(chat.query_one("#stats-figures", Static).render())
        stored = app.store.get_chat(chat.chat.id).messages if chat.chat else []
        reply = stored[-1] if stored and stored[-1].role == "assistant" else None
        describe = app.engine.describe()
    result = {
        "model": describe.get("model"),
        "method": describe.get("method"),
        "plan_source": app.planned.source if app.planned else None,
        "profile_reused": bool(app.profile and app.profile.reused),
        "ready_s": ready_s,
        "first_text_s": first_text[0] - sent if first_text else None,
        "reply_s": done - sent,
        "reply": reply.content if reply else "",
        "finish_reason": reply.finish_reason if reply else None,
        "stats": reply.stats if reply else None,
        "panel": {
            "tau": _figure(r"tau last/mean\s+\S+ / (\S+)", figures),
            "tok_per_s": _figure(r"tokens/s\s+(\S+)", figures),
            "transfer": _figure(r"transfer\s+(.+)", figures),
        },
        "panel_text": figures,
    }
    if not result["reply"] or result["panel"]["tau"] in (None, "–"):
        raise SystemExit(f"app_reply: no reply or no figures on the panel: {json.dumps(result)}")
    return result


def _finished(app, chat) -> bool:
    """The reply is stored with its finish reason (the stored row is what a user gets back)."""
    if chat.chat is None or chat.generating:
        return False
    messages = app.store.get_chat(chat.chat.id).messages
    return bool(messages) and messages[-1].role == "assistant" and messages[-1].finish_reason is not None


def _figure(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text)
    return match[1].strip() if match else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder, .gguf or hub id (default: the bundled model)")
    parser.add_argument("--method", help="default: the profile's choice")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--vram-limit-gb", type=float, help="as subspec-chat's")
    parser.add_argument("--start-timeout-s", type=float, default=900.0, help="profile + load")
    args = parser.parse_args(argv)
    result = asyncio.run(one_reply(args.model, args.method, args.prompt, args.max_new_tokens, args.start_timeout_s,
                                   args.vram_limit_gb))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
