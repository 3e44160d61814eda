"""Command-line converter: Hugging Face GPT-2 checkpoint -> pagedgpt2 model directory.

Usage: python tools/convert_hf.py SRC DST [--dtype float32|float16] [--force]
(all the work is in pagedgpt2.convert; this file is only the entry point).
"""

from pagedgpt2.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
