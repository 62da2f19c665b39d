"""IR coverage across the timm model zoo: the smallest model of every timm model module, expanded as a user would.

For each module of ``timm.list_modules()`` the smallest registered model under ``--max-params`` (counted on the meta
device, no weights) is built with random weights at ``--image-size`` where the model takes an image size (else at
its default size), run once as a plain model, then given to :func:`gpd_ds.gpd.expand` (its own numeric IR check
on) and to :func:`gpd_ds.gpd.extract`. The verdict per module:

* ``exact``: expand passed its check and the extracted student equals the source on a fresh batch (max |diff|
  within 1e-4 of the logits' scale);
* ``refused``: expand raised :class:`~gpd_ds.gpd.UnsupportedModelError` (the reason is its message);
* ``unclear``: anything else (an ``IRCheckError`` or a raw exception from inside a forward): the failures the
  project treats as bugs;
* ``skipped``: the plain model itself cannot run at the test size (or has no model under the size limit).

    python bench/ir_coverage.py                          # every module, prints the table
    python bench/ir_coverage.py --doc docs/supported_models.md
    python bench/ir_coverage.py --modules resnet densenet
"""

from __future__ import annotations

import argparse
import json
import re
import time
import warnings
from pathlib import Path

import timm
import torch

from gpd_ds.gpd import UnsupportedModelError, expand, extract

BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"


def smallest_model(module: str, max_params: float) -> tuple[str | None, int | None]:
    """(name, parameters) of the smallest model of a timm module under ``max_params``, counted without weights."""
    best = (None, None)
    for name in timm.list_models(module=module):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                n = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        except Exception:  # a model that cannot be built is simply not a candidate
            continue
        if n <= max_params and (best[1] is None or n < best[1]):
            best = (name, n)
    return best


def build(name: str, image_size: int) -> torch.nn.Module:
    """The model with random weights, built for ``image_size`` where its constructor takes an image size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return timm.create_model(name, pretrained=False, img_size=image_size).eval()
        except TypeError:  # no img_size argument: a CNN, which runs at any size
            return timm.create_model(name, pretrained=False).eval()


def run_plain(model: torch.nn.Module, image_size: int) -> tuple[tuple[int, int, int], torch.Tensor, torch.Tensor]:
    """(input size, probe, logits) at ``image_size``, else at the model's default input size."""
    default = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    error = None
    for size in dict.fromkeys([(default[0], image_size, image_size), default]):
        probe = torch.randn(2, *size)
        try:
            with torch.no_grad():
                return size, probe, model(probe)
        except Exception as err:  # try the next size, report the last failure
            error = err
    raise error


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", f"{type(err).__name__}: {err}").strip()
    text = text.split(" Supported module types:")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def verdict(name: str, image_size: int) -> dict:
    """Build, run, expand and extract one model; the outcome as a small dict."""
    torch.manual_seed(0)
    try:
        model = build(name, image_size)
        size, probe, logits = run_plain(model, image_size)
    except Exception as err:  # the plain model's own failure: reported as a skip, not ours
        return {"verdict": "skipped", "reason": "plain model does not run at the test size: " + _one_line(err)}
    try:
        gpd = expand(model, input_size=size)
        plain = extract(gpd).eval()
        with torch.no_grad():
            diff = (plain(probe) - logits).abs().max().item()
    except UnsupportedModelError as err:
        return {"verdict": "refused", "reason": _one_line(err), "input": list(size)}
    except Exception as err:  # every other failure is what this report exists to find
        return {"verdict": "unclear", "reason": _one_line(err), "input": list(size)}
    scale = max(1.0, logits.abs().max().item())
    if diff > 1e-4 * scale:
        return {"verdict": "unclear", "reason": f"extracted student differs from the source by {diff:.3g}",
                "input": list(size)}
    return {"verdict": "exact", "reason": "", "input": list(size)}


def table(rows: list[dict]) -> str:
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("exact", "refused", "unclear", "skipped")}
    lines = [f"{len(rows)} timm modules: **{counts['exact']} exact**, {counts['refused']} refused with a reason, "
             f"{counts['unclear']} unclear failures, {counts['skipped']} skipped.", "",
             "| timm module | smallest model | parameters | input | verdict | reason | seconds |",
             "|---|---|---:|---|---|---|---:|"]
    for r in rows:
        size = "x".join(map(str, r.get("input", [])[1:])) or "-"
        params = f"{r['params'] / 1e6:.1f} M" if r.get("params") else "-"
        reason = r["reason"].replace("|", "\\|")
        lines.append(f"| {r['module']} | {r['model'] or '-'} | {params} | {size} | {r['verdict']} | {reason} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", help="timm modules (default: all)")
    parser.add_argument("--max-params", type=float, default=30e6)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--doc", type=Path, help=f"replace the block between {BEGIN} and {END} of this page")
    args = parser.parse_args()
    unknown = sorted(set(args.modules or ()) - set(timm.list_modules()))
    if unknown:
        parser.error(f"--modules {' '.join(unknown)}: not timm model modules; the modules are "
                     f"{', '.join(timm.list_modules())}")
    rows = []
    for module in args.modules or timm.list_modules():
        start = time.perf_counter()
        name, params = smallest_model(module, args.max_params)
        row = {"module": module, "model": name, "params": params}
        if name is None:
            row.update(verdict="skipped", reason=f"no model under {args.max_params / 1e6:g} M parameters")
        else:
            row.update(verdict(name, args.image_size))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(f"{module:28} {name or '-':40} {row['verdict']:8} {row['seconds']:6.1f}s {row['reason'][:120]}",
              flush=True)
    text = table(rows)
    print("\n" + text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.doc:
        page = args.doc.read_text()
        head, _, rest = page.partition(BEGIN)
        _, _, tail = rest.partition(END)
        args.doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
