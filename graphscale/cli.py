"""The ``graphscale`` command: explain, widen and verify a model, or run the demo.

MODEL is a model spec (see :func:`graphscale.zoo.load_model_spec`): a built-in name (``mlp``, ``cnn``,
``gpt``, ``gpt-sdpa``, ``mha``, ``hf-gpt2``, ``hf-llama``, ``hf-bert``), ``path/to/file.py:callable`` or
``package.module:callable``; with ``--hf`` it is a Hugging Face config JSON file or a directory holding
``config.json`` (the model is built from the config, no weights are downloaded).

Errors that graphscale raises on purpose are printed as one line on stderr with exit status 2 (``--debug``
shows the traceback). ``verify`` and ``demo`` exit with status 1 when a check fails.

Example:
    $ graphscale explain gpt
    $ graphscale widen gpt --multiplier 2 --checkpoint small.safetensors --out wide.safetensors
    $ graphscale widen mlp --multiplier hidden0=3 --multiplier hidden1=2 --out wide.safetensors
    $ graphscale verify hf-llama --examples 20
    $ graphscale explain --hf path/to/config.json --json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from graphscale.errors import GraphscaleError, MultiplierError

__all__ = ["main", "parse_multiplier", "write_safetensors_atomic"]


# ---------------------------------------------------------------------------------------------------------
# argument helpers


def parse_multiplier(values: list[str] | None, default: int = 2) -> int | dict[str, int]:
    """Turn repeated ``--multiplier`` values into what :func:`graphscale.widen` takes.

    One plain integer (``2``) widens every width class by it; ``name=k`` pairs (repeatable) give each named
    class its own multiplier. Mixing the two forms, repeating a name, or a non-positive or non-integer
    value raises :class:`~graphscale.errors.MultiplierError`.

    Example:
        >>> parse_multiplier(["3"]), parse_multiplier(["mlp_hidden=2", "attn=4"]), parse_multiplier(None)
        (3, {'mlp_hidden': 2, 'attn': 4}, 2)
    """
    if not values:
        return default
    plain: list[int] = []
    named: dict[str, int] = {}
    for raw in values:
        name, sep, num = raw.partition("=")
        text = num if sep else name
        try:
            k = int(text)
        except ValueError:
            raise MultiplierError(f"multiplier {raw!r}: {text!r} is not an integer "
                                  "(use --multiplier K or --multiplier CLASS=K)") from None
        if k < 1:
            raise MultiplierError(f"multiplier {raw!r}: must be a positive integer")
        if not sep:
            plain.append(k)
        elif not name.strip():
            raise MultiplierError(f"multiplier {raw!r}: missing the class name before '='")
        elif name.strip() in named:
            raise MultiplierError(f"multiplier {raw!r}: class {name.strip()!r} is given twice")
        else:
            named[name.strip()] = k
    if plain and named or len(plain) > 1:
        raise MultiplierError("give either one --multiplier K for all width classes or one "
                              "--multiplier CLASS=K per class, not both or several plain values")
    return plain[0] if plain else named


def _load_model(args: argparse.Namespace) -> tuple[Any, tuple[Any, ...]]:
    from graphscale import zoo

    if args.hf:
        return zoo.hf_from_config(args.model)
    return zoo.load_model_spec(args.model)


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options the user gave, so the engine's own defaults apply otherwise."""
    opts: dict[str, Any] = {}
    if args.tracer is not None:
        opts["tracer"] = args.tracer
    if args.heads is not None:
        opts["heads"] = args.heads
    if getattr(args, "outputs", None) is not None:
        opts["outputs"] = args.outputs
    if args.rules:
        missing = [r for r in args.rules if not Path(r).exists()]
        if missing:
            raise GraphscaleError(f"--rules: no such file or directory: {', '.join(missing)}")
        opts["rules"] = list(args.rules)
        if getattr(args, "rules_allow_imports", False):
            from graphscale.infer.rulebook import RuleBook

            opts["rules"] = RuleBook.load(opts["rules"], allow_imports=True)
    return opts


def write_safetensors_atomic(module: Any, out: str | os.PathLike[str],
                             metadata: dict[str, str] | None = None) -> None:
    """Write ``module``'s state dict to ``out`` in safetensors format, atomically.

    The tensors go to a temporary file in the destination directory, which is flushed to disk and then
    renamed over ``out``: readers see the old file or the complete new one, never a partial write. Tensors
    that share memory (tied weights) are stored once, as ``safetensors.torch.save_model`` does; read the
    file back with ``safetensors.torch.load_model``.

    Example:
        >>> import torch, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> write_safetensors_atomic(torch.nn.Linear(2, 3), os.path.join(d, "w.safetensors"))
        >>> sorted(os.listdir(d))
        ['w.safetensors']
    """
    from safetensors.torch import save_model

    out = Path(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        save_model(module, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(out.parent if str(out.parent) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _max_abs_diff(a: Any, b: Any) -> float:
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, tuple | list) and isinstance(b, tuple | list) and len(a) == len(b):
        return max((_max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    raise GraphscaleError(f"cannot compare model outputs of types {type(a).__name__} and {type(b).__name__}")


def _outputs(model: Any, inputs: tuple[Any, ...]) -> Any:
    import torch

    with torch.no_grad():
        return model(*inputs)


# ---------------------------------------------------------------------------------------------------------
# commands


def cmd_explain(args: argparse.Namespace) -> int:
    """Print the widening plan (width classes, per-tensor scaling) of MODEL."""
    import graphscale

    opts = _engine_options(args)
    model, inputs = _load_model(args)
    plan = graphscale.analyze(model, inputs, **opts)
    data = plan.to_dict()
    text = str(plan)
    if args.noise is not None:
        from graphscale.train.noise import noise_from_spec

        scheme = noise_from_spec(args.noise)
        multiplier = parse_multiplier(args.multiplier)
        wide = graphscale.widen(model, inputs, multiplier=multiplier, plan=plan)
        formulas = {name: scheme.describe(s) for name, s in wide.graphscale.params.items()}
        data["noise"] = {"scheme": args.noise, "multipliers": wide.graphscale.multipliers,
                         "formulas": formulas}
        w = max(len(n) for n in formulas)
        text += f"\n\nnoise {args.noise} at multipliers {wide.graphscale.multipliers}:\n" + "\n".join(
            f"  {n:<{w}}  {f}" for n, f in formulas.items())
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def cmd_widen(args: argparse.Namespace) -> int:
    """Widen MODEL (optionally loaded from a narrow checkpoint) and write the wide state dict."""
    import safetensors.torch

    import graphscale

    out = Path(args.out)
    if args.checkpoint is not None:
        ckpt = Path(args.checkpoint)
        if not ckpt.is_file():
            raise GraphscaleError(f"--checkpoint {ckpt}: no such file")
        if out.resolve() == ckpt.resolve() or (out.exists() and os.path.samefile(out, ckpt)):
            raise GraphscaleError(f"--out {out} is the checkpoint itself; refusing to overwrite the input")
    if not out.parent.resolve().is_dir():
        raise GraphscaleError(f"--out {out}: directory {out.parent} does not exist")
    if out.is_dir():
        raise GraphscaleError(f"--out {out} is a directory; give a file name")
    multiplier = parse_multiplier(args.multiplier)
    opts = _engine_options(args)
    model, inputs = _load_model(args)  # built fresh from the spec: no caller's object is mutated
    if args.checkpoint is not None:
        try:
            safetensors.torch.load_model(model, args.checkpoint, strict=True)
        except Exception as e:  # shape or key mismatch, not a safetensors file, ...
            detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            detail = detail[:500] + (" ..." if len(detail) > 500 else "") or type(e).__name__
            raise GraphscaleError(f"cannot load --checkpoint {args.checkpoint} into {args.model}: "
                                  f"{detail}") from e
    narrow_out = _outputs(model, inputs)
    noise = None
    if args.noise is not None:
        from graphscale.train.noise import noise_from_spec

        noise = noise_from_spec(args.noise)
    wide = graphscale.widen(model, inputs, multiplier=multiplier, noise=noise, seed=args.seed, **opts)
    diff = _max_abs_diff(_outputs(wide, inputs), narrow_out)
    record = wide.graphscale
    metadata = {"graphscale.multipliers": json.dumps(record.multipliers), "graphscale.model": args.model}
    if args.checkpoint is not None:
        metadata["graphscale.checkpoint"] = str(args.checkpoint)
    write_safetensors_atomic(wide, out, metadata)
    n_narrow = sum(p.numel() for p in model.parameters())
    n_wide = sum(p.numel() for p in wide.parameters())
    print(f"widened {args.model} with multipliers {record.multipliers}: "
          f"{n_narrow:,} -> {n_wide:,} parameters")
    print(f"max |wide - narrow| on the example inputs: {diff:.3g}")
    print(f"wrote {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check that the widened MODEL computes the same function; exit 1 if a check fails."""
    import graphscale

    kwargs = _engine_options(args)
    if args.examples is not None:
        if args.examples < 1:
            raise GraphscaleError(f"--examples must be at least 1, got {args.examples}")
        kwargs["max_examples"] = args.examples
    if args.steps:
        import torch

        kwargs["steps"] = args.steps
        kwargs["optimizer"] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
                               "adamw": torch.optim.AdamW}[args.optimizer]
        extra = {"momentum": 0.9} if args.optimizer == "sgd" else {"eps": 1e-3}
        kwargs["hparams"] = {"lr": args.lr} | extra
    multiplier = parse_multiplier(args.multiplier) if args.multiplier else None
    model, inputs = _load_model(args)
    report = graphscale.verify(model, inputs, multiplier=multiplier, **kwargs)
    print(report)
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Analyze, widen x2 and verify the built-in GPT; print the plan and the output differences."""
    import graphscale
    from graphscale import zoo

    model, inputs = zoo.gpt()
    print("== graphscale demo: the built-in GPT (2 layers, 4 heads, n_embd 64, tied readout) ==\n")
    plan = graphscale.analyze(model, inputs)
    print(plan)
    print("\n== widen x2 ==")
    wide = graphscale.widen(model, inputs, multiplier=2)
    n_narrow = sum(p.numel() for p in model.parameters())
    n_wide = sum(p.numel() for p in wide.parameters())
    scale = _outputs(model, inputs).abs().max().item()
    diff32 = _max_abs_diff(_outputs(wide, inputs), _outputs(model, inputs))
    print(f"parameters: {n_narrow:,} -> {n_wide:,}")
    print(f"float32: max |wide - narrow| logit difference {diff32:.3g} (max |logit| {scale:.3g})")
    model64 = copy.deepcopy(model).double()
    wide64 = graphscale.widen(model64, inputs, multiplier=2)
    diff64 = _max_abs_diff(_outputs(wide64, inputs), _outputs(model64, inputs))
    print(f"float64: max |wide - narrow| logit difference {diff64:.3g}")
    print("\n== verify ==")
    report = graphscale.verify(model, inputs, multiplier=2)
    print(report)
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``graphscale`` command.

    Example:
        >>> build_parser().parse_args(["explain", "gpt", "--json"]).json
        True
    """
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback on errors")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("model", metavar="MODEL",
                       help="built-in name, path/to/file.py:callable or package.module:callable "
                            "(with --hf: a config JSON file or a directory with config.json)")
    model.add_argument("--hf", action="store_true",
                       help="MODEL is a Hugging Face config file or directory")
    model.add_argument("--tracer", choices=["auto", "fx", "export"], default=None,
                       help="graph capture frontend (default: auto)")
    model.add_argument("--heads", choices=["fixed", "grow"], default=None,
                       help="attention: keep the head count and widen head_dim (fixed, the default), "
                            "or copy heads (grow)")
    model.add_argument("--rules", action="append", metavar="PATH",
                       help="extra rule file or directory (repeatable)")
    model.add_argument("--rules-allow-imports", action="store_true",
                       help="let --rules targets import modules the model has not imported (runs their code)")
    model.add_argument("--outputs", choices=["fixed", "width"], default=None,
                       help="keep the model outputs' axes fixed (default) or let them grow (a backbone "
                            "whose output is its hidden state)")

    mult = argparse.ArgumentParser(add_help=False)
    mult.add_argument("--multiplier", action="append", metavar="K|CLASS=K",
                      help="width multiplier: one integer for all width classes, or CLASS=K per class "
                           "(repeatable); default 2")

    parser = argparse.ArgumentParser(
        prog="graphscale", parents=[debug],
        description="Widen (μpscale) trained PyTorch models exactly, with derived μP scaling rules.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("explain", parents=[debug, model, mult],
                       help="show the width classes and scaling plan")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--noise", metavar="SCHEME[:S]",
                   help="also show each tensor's noise formula: none, gaussian:STD, spectral:T, "
                        "symmetric:STD, or gaussian_relative:STD / symmetric_relative:STD (STD times "
                        "each weight's RMS)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("widen", parents=[debug, model, mult],
                       help="widen a model (and its checkpoint) and write the wide weights")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="narrow weights (.safetensors) to load into MODEL before widening; never modified")
    p.add_argument("--out", metavar="FILE", required=True,
                   help="where to write the widened state dict (.safetensors, written atomically)")
    p.add_argument("--noise", metavar="SCHEME[:S]",
                   help="symmetry-breaking noise: none (default), gaussian:STD, spectral:T, symmetric:STD, "
                        "gaussian_relative:STD, symmetric_relative:STD (STD times each weight's RMS)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.set_defaults(func=cmd_widen)

    p = sub.add_parser("verify", parents=[debug, model, mult],
                       help="check that the widened model computes the same function")
    p.add_argument("--examples", type=int, metavar="N", help="number of property-based test examples")
    p.add_argument("--steps", type=int, default=0, metavar="N",
                   help="also train narrow and wide side by side for N steps and report the divergence")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="adamw",
                   help="optimizer for --steps (default adamw; eps 1e-3 for Adam, momentum 0.9 for SGD)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate for --steps (default 1e-2)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", parents=[debug],
                       help="analyze, widen x2 and verify the built-in GPT")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``graphscale`` command; returns the exit status.

    Example:
        >>> main(["explain", "no-such-model"])  # doctest: +SKIP
        graphscale: error: unknown model 'no-such-model'; expected a built-in name (mlp, cnn, ...) ...
        2
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except GraphscaleError as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"graphscale: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
