"""`subspec-chat`'s command line, parsed before the app is imported: --help and a usage error
answer at once instead of after torch and Textual load (seconds on a CPU)."""

from __future__ import annotations

import argparse

from engine import METHODS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subspec-chat", description="Chat with local models larger than your GPU.")
    parser.add_argument("--model", help="hub id, model folder or .gguf file (default: the last one used, "
                        "else the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--method", choices=METHODS, help="decoding method (default: the last one chosen, "
                        "else the fastest this machine's profile measured)")
    parser.add_argument("--draft-model-path", help="the draft model of classic_sd (same tokenizer as the model)")
    parser.add_argument("--vram-limit-gb", type=float, help="plan for a smaller GPU than this one (GiB)")
    parser.add_argument("--max-length", type=int, help="context in tokens, prompt and reply (default: the profile's, "
                        "8192 where it costs no stream buffer)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from subspec_tui.app import SubSpecChatApp

    if args.vram_limit_gb is not None and args.vram_limit_gb <= 0:
        build_parser().error("--vram-limit-gb must be greater than 0")
    if args.max_length is not None and args.max_length < 2:
        build_parser().error("--max-length must be at least 2")
    SubSpecChatApp(model_ref=args.model, method=args.method, draft_model_path=args.draft_model_path,
                   vram_limit_gb=args.vram_limit_gb, max_length=args.max_length).run()


if __name__ == "__main__":
    main()
