"""MemLens on the command line: ``export`` a report bundle, ``analyze`` a prompt as text.

``python cli.py export --prompt "..." --out DIR`` (or ``python app.py export ...`` once
:func:`register` is wired into ``app.py``) runs the same analysis and figure code as the app and
writes one ZIP report bundle (see :mod:`components.export`). ``python cli.py analyze --prompt
"..."`` prints the strongest heads by type and how much of each token survives per layer.

Bad input (an empty prompt, an unknown model, a layer out of range, an unknown format, an --out
that cannot be written) prints one line on stderr and exits with status 2; PNG or SVG export
where kaleido or Chromium is missing exits with status 3. No traceback either way.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from analysis.models import DEMO_MODEL

logger = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
_HEAD_TYPES = (
    ("previous_token", "previous token"),
    ("duplicate_token", "duplicate token"),
    ("induction", "induction"),
)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="the text to analyse")
    parser.add_argument(
        "--model",
        default=DEMO_MODEL,
        help=f"model name or checkpoint directory (default {DEMO_MODEL})",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` and ``analyze`` commands to an argparse sub-command set.

    Each command's parsed arguments carry ``handler``: call ``args.handler(args)`` and exit with
    the status it returns (0, :data:`EXIT_BAD_INPUT` or :data:`EXIT_UNAVAILABLE`).
    """
    from components.export import DEFAULT_SCALE, FORMATS

    export = subparsers.add_parser(
        "export",
        help="write a report bundle (ZIP of figures, data, report.html, manifest.json)",
        description="Analyse a prompt and write every view of it as one ZIP report bundle.",
    )
    _add_common(export)
    export.add_argument("--out", default=".", help="directory for the ZIP (default: here)")
    export.add_argument(
        "--layers", help="layers to include, e.g. 0,2 or 1-3 (default: all)", default=None
    )
    export.add_argument(
        "--heads",
        default=None,
        help="heads to export one by one in each layer, e.g. 0,3 (default: one grid per layer)",
    )
    export.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help=f"per-figure formats, comma-separated (default {','.join(FORMATS)})",
    )
    export.add_argument(
        "--scale",
        type=float,
        default=DEFAULT_SCALE,
        help=f"PNG/SVG scale: a PNG is width*scale pixels wide (default {DEFAULT_SCALE:g})",
    )
    export.add_argument("--dark", action="store_true", help="dark figure template")
    export.set_defaults(handler=_guarded(_export, "export"))

    analyze = subparsers.add_parser(
        "analyze",
        help="print a short summary of a prompt: strongest heads, retention per layer",
        description="Analyse a prompt and print its strongest heads and retention per layer.",
    )
    _add_common(analyze)
    analyze.set_defaults(handler=_guarded(_analyze, "analyze"))


def _guarded(
    command: Callable[[argparse.Namespace], None], name: str
) -> Callable[[argparse.Namespace], int]:
    """``command`` with its errors turned into one line on stderr and an exit status."""
    from components.export import ExportUnavailableError

    def run(args: argparse.Namespace) -> int:
        try:
            command(args)
        except ExportUnavailableError as exc:
            print(f"memlens {name}: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        except ValueError as exc:
            print(f"memlens {name}: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except OSError as exc:  # --out not creatable, read-only or full; a checkpoint unreadable
            where = f" {exc.filename}" if exc.filename else ""
            print(f"memlens {name}: cannot use{where}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print(f"memlens {name}: interrupted", file=sys.stderr)
            return 130
        return 0

    return run


def _export(args: argparse.Namespace) -> None:
    """Analyse the prompt and write its report bundle into ``--out``; print the ZIP's path."""
    from tqdm import tqdm

    import analysis
    from analysis.bundle import collect_report, parse_indices
    from components.export import check_formats, check_scale, write_bundle

    # Everything that needs no model is checked first, so a typo costs no forward pass.
    formats = check_formats(args.formats)
    check_scale(args.scale)
    parse_indices(args.layers, sys.maxsize, "layers")
    parse_indices(args.heads, sys.maxsize, "heads")
    if "\x00" in args.out:
        raise ValueError("--out contains a NUL character; give a directory path")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a directory")

    pa = analysis.analyze(args.prompt, args.model, allow_any_path=True)
    layers = parse_indices(args.layers, pa.n_layers, "layers")
    heads = parse_indices(args.heads, pa.n_heads, "heads")
    inputs = collect_report(pa, layers=layers, heads=heads)

    with tqdm(desc="export", unit="file", file=sys.stderr, dynamic_ncols=True) as bar:

        def progress(done: int, total: int, name: str) -> None:
            if bar.total != total:
                bar.total = total
            bar.set_postfix_str(name, refresh=False)
            bar.update(done - bar.n)

        path = write_bundle(
            inputs, out, formats=formats, scale=args.scale, dark=args.dark, progress=progress
        )
    print(path)


def _analyze(args: argparse.Namespace) -> None:
    """Print the prompt's strongest heads by type and its retention per layer."""
    import analysis
    from analysis.heads import prompt_head_scores
    from analysis.retention import embedding_cosine, resid_norms

    pa = analysis.analyze(args.prompt, args.model, allow_any_path=True)
    loss = pa.loss
    lines = [
        f"{pa.model_id} · weights {pa.meta.get('fingerprint', '?')} · {pa.n_pos} tokens · "
        f"{pa.n_layers} layers x {pa.n_heads} heads",
    ]
    if len(loss):
        lines.append(f"mean loss {float(loss.mean()):.3f} nats over {len(loss)} predictions")

    lines += ["", "Strongest heads on this prompt (mean attention to the expected key)"]
    scores = prompt_head_scores(pa)
    for name, label in _HEAD_TYPES:
        try:
            layer, head, score = scores.best(name)
            lines.append(f"  {label:<16} L{layer}H{head}  {score:.3f}")
        except ValueError:
            lines.append(f"  {label:<16} n/a (no token of the prompt repeats)")

    # Retention: how large the stream is and how much it still points at the token's embedding.
    norms = resid_norms(pa).mean(-1)
    cosines = embedding_cosine(pa).mean(-1)
    lines += ["", "Retention per stage (mean over positions)"]
    lines.append(f"  {'stage':<10} {'resid norm':>10} {'cos to W_E':>10}")
    stages = ["embed", *(f"after L{layer}" for layer in range(pa.n_layers))]
    for stage, norm, cosine in zip(stages, norms, cosines, strict=True):
        lines.append(f"  {stage:<10} {float(norm):>10.3f} {float(cosine):>10.3f}")
    drop = float(cosines[0] - cosines[-1]) if len(cosines) else float("nan")
    lines.append(f"  identity lost from embed to output: {drop:.3f} (cosine)")
    print("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser of ``python cli.py``."""
    parser = argparse.ArgumentParser(prog="cli.py", description="MemLens command line")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (argparse exits with 2 on unknown flags)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
