#!/usr/bin/env python3
"""Golden logits of code-byte-9m from Hugging Face transformers, for the reference frontend's test.

Runs LlamaForCausalLM on two fixed byte sequences (the first 200 bytes of two Python snippets
embedded below; the second at positions 1000..1199 to exercise explicit position ids):
  * fp32 on the CPU, on the bf16 checkpoint upcast to fp32 (eager attention): what the C++
    frontend (fp32 compute) must reproduce to ~1e-5 relative;
  * bf16 on CUDA (the checkpoint's own dtype, default attention), where a GPU is present.
Writes tests/data/llama/golden_logits.json: per sequence the tokens, positions, the full logits
(all 256 entries) of a few rows and the argmax of every row, per run. Prints a table and a JSON
line comparing the two runs. Needs only torch and transformers (no ropekv).

  python3 bench/torch/llama_logits_golden.py [--model DIR] [--out FILE]

The C++ test (llama_trained_model_test, LogitsEqualTransformers) reads the file when it exists.
"""

import argparse
import json
import os
import platform
import sys

import torch
import transformers
from transformers import LlamaForCausalLM

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

TEXT_A = b'''import os
import sys
from collections import defaultdict


def count_words(path):
    """Return a mapping of word -> number of occurrences in the file at path."""
    counts = defaultdict(int)
    with open(path, encoding="utf-8") as f:
        for line in f:
            for word in line.split():
                counts[word.lower()] += 1
    return dict(counts)
'''

TEXT_B = b'''class Stack:
    """A last-in, first-out container."""

    def __init__(self):
        self._items = []

    def push(self, item):
        self._items.append(item)

    def pop(self):
        if not self._items:
            raise IndexError("pop from an empty stack")
        return self._items.pop()

    def __len__(self):
        return len(self._items)
'''

SEQUENCES = [
    # name, bytes, first position
    ("a", TEXT_A[:200], 0),
    ("b", TEXT_B[:200], 1000),
]
LOGIT_ROWS = [0, 1, 63, 127, 199]


def load(model_dir, dtype, attn):
    kwargs = {"attn_implementation": attn}
    try:  # transformers >= 4.56 spells it dtype; older ones torch_dtype
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs)
    except TypeError:
        model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=dtype, **kwargs)
    # Older versions may take an unknown `dtype` into the config and load fp32: cast explicitly
    # (bf16 -> fp32 is exact; fp32 -> bf16 recovers the checkpoint's bf16 values exactly).
    model = model.to(dtype)
    for p in model.parameters():
        assert p.dtype == dtype, (p.dtype, dtype)
    return model


@torch.no_grad()
def run(model, tokens, positions, device):
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    pos = torch.tensor([positions], dtype=torch.long, device=device)
    out = model(input_ids=ids, position_ids=pos, use_cache=False)
    return out.logits[0].float().cpu()  # [n][vocab]


def pack(logits):
    return {
        "logits": [[float(x) for x in logits[r].tolist()] for r in LOGIT_ROWS],
        "argmax": [int(x) for x in logits.argmax(dim=-1).tolist()],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(REPO, "tests/data/models/code-byte-9m"))
    ap.add_argument("--out", default=os.path.join(REPO, "tests/data/llama/golden_logits.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    fp32 = load(args.model, torch.float32, "eager").eval()
    bf16 = None
    device_name = None
    if torch.cuda.is_available():
        bf16 = load(args.model, torch.bfloat16, "sdpa").to("cuda").eval()
        device_name = torch.cuda.get_device_name(0)

    doc = {
        "model": os.path.basename(os.path.normpath(args.model)),
        "generator": "bench/torch/llama_logits_golden.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fp32": "cpu, eager attention, bf16 checkpoint upcast to fp32",
        "bf16": f"cuda ({device_name}), sdpa attention" if bf16 is not None else None,
        "sequences": [],
    }
    rows = []
    for name, text, start in SEQUENCES:
        tokens = list(text)
        positions = list(range(start, start + len(tokens)))
        l32 = run(fp32, tokens, positions, "cpu")
        seq = {"name": name, "tokens": tokens, "positions": positions, "logit_rows": LOGIT_ROWS,
               "fp32": pack(l32)}
        row = {"sequence": name, "tokens": len(tokens), "first_position": start}
        # Teacher-forced quality of the fp32 run, as a sanity check of the model itself.
        logp = torch.log_softmax(l32[:-1].double(), dim=-1)
        nxt = torch.tensor(tokens[1:])
        row["fp32_bits_per_byte"] = float(-logp[torch.arange(len(nxt)), nxt].mean() / torch.log(torch.tensor(2.0)))
        row["fp32_accuracy"] = float((l32[:-1].argmax(-1) == nxt).double().mean())
        if bf16 is not None:
            lb = run(bf16, tokens, positions, "cuda")
            seq["bf16"] = pack(lb)
            row["bf16_vs_fp32_max_abs"] = float((lb - l32).abs().max())
            row["bf16_vs_fp32_rel"] = row["bf16_vs_fp32_max_abs"] / float(l32.abs().max())
            row["bf16_argmax_agree"] = float((lb.argmax(-1) == l32.argmax(-1)).double().mean())
        doc["sequences"].append(seq)
        rows.append(row)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")

    cols = ["sequence", "tokens", "first_position", "fp32_bits_per_byte", "fp32_accuracy",
            "bf16_vs_fp32_max_abs", "bf16_vs_fp32_rel", "bf16_argmax_agree"]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"bf16 device: {device_name or 'none (no CUDA: fp32 only)'}")
    print(" | ".join(f"{c:>20}" for c in cols))
    for r in rows:
        print(" | ".join(f"{(f'{r[c]:.4g}' if isinstance(r.get(c), float) else str(r.get(c, '-'))):>20}"
                         for c in cols))
    print(f"wrote {args.out}")
    print(json.dumps({"bench": "llama_logits_golden", "device": device_name, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
