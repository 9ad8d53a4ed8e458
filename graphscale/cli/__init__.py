"""The ``graphscale`` command: explain, widen and verify a model, upscale a Hugging Face directory, or run
the demo.

``upscale SRC_DIR --out DST_DIR`` widens a Hugging Face model directory into one that ``from_pretrained``
loads (see :mod:`graphscale.hf`).

MODEL is a model spec (see :mod:`graphscale.cli.spec`): a built-in name (``mlp``, ``cnn``, ``gpt``,
``gpt-sdpa``, ``mha``, ``hf-gpt2``, ``hf-llama``, ``hf-bert``), optionally with builder arguments
(``gpt:n_embd=128``), ``path/to/file.py:callable`` (**the file is executed**) or
``package.module:callable``; with ``--hf`` it is a Hugging Face config JSON file or a directory holding
``config.json`` (the model is built from the config, no weights are downloaded, no code from the directory
runs).

``widen --into LARGER`` fills the user's larger model (a spec like MODEL, or with ``--hf`` a larger config)
with :func:`graphscale.widen_into` and writes its state dict: it loads strictly into that class and computes
the narrow model's function. Without ``--into`` the file holds graphscale's wide GraphModule's weights,
marked ``graphscale.format = graphmodule``; read it with :func:`graphscale.load_widened` (see
:mod:`graphscale.cli.widened`).

Files: ``--out`` may not name any input (checkpoint, model file, rules, HF config directory, through
symlinks and hard links); an existing ``--out`` needs ``--force``; the write is atomic and gets the umask's
mode; SIGTERM removes the partial file; temporary files of killed runs are removed on the next run.

Errors that graphscale raises on purpose are printed as one line on stderr with exit status 2 (``--debug``
shows the traceback). ``verify`` and ``demo`` exit with status 1 when a check fails; SIGTERM exits 143.

Example:
    $ graphscale explain gpt
    $ graphscale widen gpt --multiplier 2 --checkpoint small.safetensors --out wide.safetensors
    $ graphscale widen gpt --checkpoint small.safetensors --into gpt:n_embd=128 --out large.safetensors
    $ graphscale widen mlp --multiplier hidden0=3 --multiplier hidden1=2 --out wide.safetensors --force
    $ graphscale verify hf-llama --examples 20
    $ graphscale upscale path/to/hf-model --multiplier 2 --out path/to/hf-model-x2
    $ graphscale explain --hf path/to/config.json --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from graphscale.capture import TRACERS
from graphscale.cli.files import (
    Terminated,
    check_out,
    describe_os_error,
    note,
    remove_stale_temps,
    sigterm_raises,
    write_safetensors_atomic,
)
from graphscale.cli.widened import FORMAT_GRAPHMODULE, FORMAT_MODULE
from graphscale.errors import GraphscaleError, MultiplierError
from graphscale.mupcompat import deepcopy_keeping_tensor_attributes

__all__ = ["main", "parse_multiplier", "parse_noise", "write_safetensors_atomic"]

EXIT_SIGTERM = 128 + 15
EXIT_SIGPIPE = 128 + 13
EXIT_INTERRUPT = 128 + 2


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


def parse_noise(text: str | None) -> Any:
    """Turn a ``--noise`` value into a noise scheme (``None`` for no noise), refusing what is not a scheme.

    ``none``, or ``KIND:VALUE`` with KIND one of gaussian, spectral, symmetric, gaussian_relative,
    symmetric_relative and VALUE a finite number >= 0, as :func:`graphscale.train.noise.noise_from_spec`
    reads it. Anything else (``foo:1``, ``gaussian:nan``, ``gaussian:-1``, ``gaussian:inf``) raises
    :class:`~graphscale.errors.GraphscaleError` naming ``--noise``.

    Example:
        >>> parse_noise("gaussian:0.5"), parse_noise("none")
        (GaussianNoise(std=0.5, relative=False), None)
        >>> parse_noise("gaussian:nan")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        graphscale.errors.GraphscaleError: --noise 'gaussian:nan': ...must be a finite number >= 0, got nan
    """
    from graphscale.train.noise import NoNoise, noise_from_spec

    if text is None:
        return None
    try:
        scheme = noise_from_spec(text)
    except (ValueError, TypeError) as e:  # an unknown kind, not a number, NaN, inf or negative
        raise GraphscaleError(f"--noise {text!r}: {e}") from e
    return None if isinstance(scheme, NoNoise) else scheme


def _load_model(args: argparse.Namespace) -> tuple[Any, tuple[Any, ...]]:
    from graphscale.cli import spec

    return spec.load(args.model, hf=args.hf)


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


def _max_abs_diff(a: Any, b: Any) -> float:
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, tuple | list) and isinstance(b, tuple | list) and len(a) == len(b):
        return max((_max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    raise GraphscaleError(f"cannot compare model outputs of types {type(a).__name__} and {type(b).__name__}")


def _max_abs(a: Any) -> float:
    import torch

    if isinstance(a, torch.Tensor):
        return a.double().abs().max().item() if a.numel() else 0.0
    return max((_max_abs(x) for x in a), default=0.0)


def _outputs(model: Any, inputs: tuple[Any, ...]) -> Any:
    import torch

    with torch.no_grad():
        return model(*inputs)


def _input_files(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """Every file ``widen`` reads, as ``(what, path)``: none of them may be ``--out``."""
    from graphscale.cli.spec import spec_files

    files: list[tuple[str, Path]] = []
    if args.checkpoint is not None:
        files.append(("the --checkpoint", Path(args.checkpoint)))
    files += [(f"MODEL {args.model}", f) for f in spec_files(args.model, hf=args.hf)]
    if args.into is not None:
        files += [(f"--into {args.into}", f) for f in spec_files(args.into, hf=args.hf)]
    for r in args.rules or []:
        p = Path(r)
        found = sorted(p.rglob("*")) if p.is_dir() else [p]
        files += [(f"--rules {r}", f) for f in found if f.is_file()]
    return files


def _nonfinite(module: Any, buffers: bool = True) -> dict[str, Any]:
    """``{name: isfinite mask}`` of the floating-point parameters (and buffers) holding a NaN or an inf."""
    import torch

    tensors = [*module.named_parameters(), *(module.named_buffers() if buffers else [])]
    bad = {}
    for name, t in tensors:
        if t.is_floating_point() or t.is_complex():
            finite = torch.isfinite(t.detach())
            if not bool(finite.all()):
                bad[name] = finite
    return bad


def _refuse_nonfinite(module: Any, what: str, hint: str, by_design: dict[str, Any] | None = None,
                      buffers: bool = True) -> None:
    """Refuse non-finite values, except buffers that the model itself defines so (``by_design``: an
    additive ``-inf`` attention mask), at exactly the same positions."""
    import torch

    by_design = by_design or {}
    bad = [name for name, finite in _nonfinite(module, buffers).items()
           if not (name in by_design and torch.equal(by_design[name], finite))]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise GraphscaleError(f"{what} holds NaN or infinite values ({shown}); {hint}")


def _check_into_multipliers(args: argparse.Namespace, got: dict[str, int]) -> None:
    """With --into the multipliers come from the larger model's shapes; a given --multiplier must agree."""
    if not args.multiplier:
        return
    want = parse_multiplier(args.multiplier)
    if isinstance(want, int):
        wrong = {c: k for c, k in got.items() if k != want}
    else:
        unknown = [c for c in want if c not in got]
        if unknown:
            raise MultiplierError(f"--multiplier: unknown width class {unknown[0]!r}; the classes are "
                                  f"{', '.join(got)}")
        wrong = {c: got[c] for c, k in want.items() if got[c] != k}
    if wrong:
        raise MultiplierError(f"--multiplier {' '.join(args.multiplier)} disagrees with --into {args.into}, "
                              f"whose shapes give {got}; drop --multiplier or build the larger model to "
                              "match")


def _write(module: Any, out: Path, metadata: dict[str, str]) -> None:
    from safetensors import SafetensorError

    try:
        write_safetensors_atomic(module, out, metadata)
    except (OSError, SafetensorError) as e:  # read-only directory, full disk, quota, file-size limit, ...
        # safetensors reports its own write failures ("File too large (os error 27)") as SafetensorError
        reason = describe_os_error(e) if isinstance(e, OSError) else str(e).splitlines()[0]
        kept = "the existing file is unchanged" if out.exists() else "nothing was written"
        raise GraphscaleError(f"cannot write --out {out}: {reason}; {kept}") from e


# ---------------------------------------------------------------------------------------------------------
# commands


def cmd_explain(args: argparse.Namespace) -> int:
    """Print the widening plan (width classes, per-tensor scaling) of MODEL."""
    import graphscale

    opts = _engine_options(args)
    scheme = parse_noise(args.noise) if args.noise is not None else None
    model, inputs = _load_model(args)
    plan = graphscale.analyze(model, inputs, **opts)
    data = plan.to_dict()
    text = str(plan)
    if args.noise is not None:
        from graphscale.train.noise import NoNoise

        scheme = scheme if scheme is not None else NoNoise()
        multiplier = parse_multiplier(args.multiplier)
        wide = graphscale.widen(model, inputs, multiplier=multiplier, plan=plan)  # checks memory first
        formulas = {name: scheme.describe(s) for name, s in wide.graphscale.params.items()}
        data["noise"] = {"scheme": args.noise, "multipliers": wide.graphscale.multipliers,
                         "formulas": formulas}
        w = max(len(n) for n in formulas)
        text += f"\n\nnoise {args.noise} at multipliers {wide.graphscale.multipliers}:\n" + "\n".join(
            f"  {n:<{w}}  {f}" for n, f in formulas.items())
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def cmd_widen(args: argparse.Namespace) -> int:
    """Widen MODEL (optionally loaded from a narrow checkpoint) and write the wide state dict.

    Without --into: graphscale's wide GraphModule's state dict (format ``graphmodule``). With --into: the
    larger model's state dict, filled by :func:`graphscale.widen_into` (format ``module``).
    """
    import safetensors.torch
    import torch

    import graphscale

    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise GraphscaleError(f"--checkpoint {args.checkpoint}: no such file")
    out = check_out(args.out, _input_files(args), args.force)
    parent = out.parent if str(out.parent) else Path(".")
    for stale in remove_stale_temps(parent):
        note(f"removed {stale}, a partial file left by a graphscale run that was killed")
    if not os.access(parent, os.W_OK):
        raise GraphscaleError(f"cannot write --out {out}: directory {parent} is not writable")
    multiplier = parse_multiplier(args.multiplier)
    noise = parse_noise(args.noise)
    opts = _engine_options(args)
    model, inputs = _load_model(args)  # built fresh from the spec: no caller's object is mutated
    out = check_out(out, _input_files(args), args.force)  # a module:callable spec's file is known now
    buffer_names = {name for name, _ in model.named_buffers()}
    # buffers the spec itself builds non-finite (an additive -inf mask) are the model's design, not damage
    by_design = {n: f for n, f in _nonfinite(model).items() if n in buffer_names}
    if args.checkpoint is not None:
        try:
            safetensors.torch.load_model(model, args.checkpoint, strict=True)
        except Exception as e:  # shape or key mismatch, not a safetensors file, ...
            detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            detail = detail[:500] + (" ..." if len(detail) > 500 else "") or type(e).__name__
            raise GraphscaleError(f"cannot load --checkpoint {args.checkpoint} into {args.model}: "
                                  f"{detail}") from e
        if not args.allow_nonfinite:
            _refuse_nonfinite(model, f"--checkpoint {args.checkpoint}",
                              "widening would copy them; pass --allow-nonfinite to widen it anyway",
                              by_design)
    narrow_out = _outputs(model, inputs)
    metadata = {"graphscale.source": args.model, "graphscale.model": args.model,
                "graphscale.hf": "true" if args.hf else "false"}
    if args.checkpoint is not None:
        metadata["graphscale.checkpoint"] = str(args.checkpoint)
    if args.into is not None:
        from graphscale.cli import spec

        wide, _ = spec.load(args.into, hf=args.hf)
        out = check_out(out, _input_files(args), args.force)
        record = graphscale.widen_into(model, wide, inputs, **opts)
        _check_into_multipliers(args, record.multipliers)
        if noise is not None:
            noise.apply(wide, record, torch.Generator().manual_seed(args.seed))
            record.notes.append(f"noise: {noise!r} (seed {args.seed})")
        metadata |= {"graphscale.format": FORMAT_MODULE, "graphscale.into": args.into}
    else:
        wide = graphscale.widen(model, inputs, multiplier=multiplier, noise=noise, seed=args.seed,
                                **opts)  # refuses a wide model that cannot fit before allocating it
        record = wide.graphscale
        options = {k: v for k, v in opts.items() if k != "rules"}
        metadata |= {"graphscale.format": FORMAT_GRAPHMODULE, "graphscale.options": json.dumps(options)}
        if args.rules:
            metadata["graphscale.rules"] = json.dumps(list(args.rules))
    metadata["graphscale.multipliers"] = json.dumps(record.multipliers)
    wide_out = _outputs(wide, inputs)
    diff = _max_abs_diff(wide_out, narrow_out)
    if not args.allow_nonfinite:
        # the wide buffers copy the narrow ones: check them only where the narrow model's are all finite
        _refuse_nonfinite(wide, "the widened model", "nothing was written (pass --allow-nonfinite to write "
                          "it anyway)", buffers=not by_design)
    _write(wide, out, metadata)
    n_narrow = sum(p.numel() for p in model.parameters())
    n_wide = sum(p.numel() for p in wide.parameters())
    what = f"into {args.into}" if args.into is not None else "with"
    print(f"widened {args.model} {what} multipliers {record.multipliers}: "
          f"{n_narrow:,} -> {n_wide:,} parameters")
    scale = _max_abs(narrow_out)
    rel = diff / scale if scale > 0 else diff
    print(f"max |wide - narrow| on the example inputs: {diff:.3g} (relative {rel:.3g})")
    print(f"wrote {out}")
    if args.into is None:
        note(f"{out} holds graphscale's wide GraphModule's weights: load them with "
             f"graphscale.load_widened({args.model!r}, {str(out)!r}). Loaded into your own class "
             "(safetensors.torch.load_model) they compute a different function; for that, use --into LARGER.")
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    """Widen a Hugging Face model directory into a new one (see :func:`graphscale.hf.upscale`)."""
    from graphscale import hf
    from graphscale.record import load_record

    if isinstance(args.multiplier, bool) or args.multiplier < 1:
        raise MultiplierError(f"--multiplier {args.multiplier}: expected an integer >= 1")
    noise = parse_noise(args.noise)
    out = hf.upscale(args.src, multiplier=args.multiplier, out=args.out, heads=args.heads, noise=noise,
                     seed=args.seed, dtype=args.dtype, force=args.force,
                     max_shard_size=int(args.max_shard_size) if args.max_shard_size.isdigit()
                     else args.max_shard_size, stream=args.stream, progress=args.progress or None)
    record = load_record(out)
    changes = ", ".join(f"{f} {a} -> {b}" for f, (a, b) in record.info.get("config_changes", {}).items())
    check = record.info.get("check", {})
    errors = ", ".join(f"vs {k} {v:.3g}" for k, v in check.get("relative_error", {}).items())
    print(f"upscaled {args.src} x{args.multiplier} (heads {args.heads}): {changes}")
    how = ("streamed tensor by tensor; checked one-layer models" if check.get("streamed")
           else f"reloaded {out} with from_pretrained")
    print(f"{how}: max relative logit error {errors} "
          f"(allowed {check.get('tolerance', float('nan')):g}, {check.get('dtype')})")
    for line in record.notes:
        if line.startswith(("noise:", "the class computes")):
            print(line)
    print(f"wrote {out} (weights, config.json, graphscale.json, and the source's other files)")
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
    if multiplier is not None:  # refuse a wide model that cannot fit before verify allocates it
        from graphscale.widen import check_memory

        plan = graphscale.analyze(model, inputs, **_engine_options(args))
        check_memory(plan, plan.sizes(plan.multipliers(multiplier)))
        kwargs["plan"] = plan  # verify reuses it rather than analyzing the model again
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
    model64 = deepcopy_keeping_tensor_attributes(model).double()
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
                       help="built-in name (optionally with builder arguments: gpt:n_embd=128), "
                            "path/to/file.py:callable (this EXECUTES the file: name only files you trust) or "
                            "package.module:callable (with --hf: a config JSON file or a directory with "
                            "config.json; no code from it runs, a config with an auto_map is refused)")
    model.add_argument("--hf", action="store_true",
                       help="MODEL (and --into) is a Hugging Face config file or directory")
    model.add_argument("--tracer", choices=list(TRACERS), default=None,
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
                   help="where to write the widened state dict (.safetensors, written atomically with the "
                        "umask's mode); may not name an input")
    p.add_argument("--into", metavar="LARGER",
                   help="your larger model, a spec like MODEL (gpt:n_embd=128, file.py:build_large; with "
                        "--hf a larger config): fill it with graphscale.widen_into (scales folded into the "
                        "weights) and write ITS state dict, which loads strictly into your class. Without "
                        "--into the file holds graphscale's wide GraphModule: read it with "
                        "graphscale.load_widened")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="widen a checkpoint holding NaN or infinite values (refused by default)")
    p.add_argument("--noise", metavar="SCHEME[:S]",
                   help="symmetry-breaking noise: none (default), gaussian:STD, spectral:T, symmetric:STD, "
                        "gaussian_relative:STD, symmetric_relative:STD (STD times each weight's RMS); "
                        "STD a finite number >= 0")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.set_defaults(func=cmd_widen)

    p = sub.add_parser("upscale", parents=[debug],
                       help="widen a Hugging Face model directory (config.json + safetensors) into a new one "
                            "that from_pretrained loads, with the μP record (graphscale.json)")
    p.add_argument("src", metavar="SRC_DIR",
                   help="Hugging Face model directory: config.json and model.safetensors or shards with "
                        "model.safetensors.index.json; no code from it runs (an auto_map is refused); "
                        "never modified")
    p.add_argument("--multiplier", type=int, default=2, metavar="K", help="width multiplier (default 2)")
    p.add_argument("--out", metavar="DST_DIR", required=True,
                   help="directory to write (atomically: a temporary directory beside it, then a rename); "
                        "may not be SRC_DIR, inside it, or contain it")
    p.add_argument("--heads", choices=["fixed", "grow"], default="fixed",
                   help="keep the head counts and widen head_dim (fixed, the default), or copy heads (grow; "
                        "needed where the class derives a rotary embedding from head_dim)")
    p.add_argument("--noise", metavar="SCHEME[:S]",
                   help="symmetry-breaking noise, as for widen: none (default), gaussian:STD, "
                        "spectral:T, ...")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0); the same seed writes the "
                                                         "same files")
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"], default=None,
                   help="dtype to load, widen and write in (default: the checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest weights shard save_pretrained writes (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace an existing DST_DIR")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="widen tensor by tensor without loading the model (--stream), or load, fill and "
                        "reload it whole (--no-stream); default: stream when the weights exceed 1 GiB")
    p.add_argument("--progress", action="store_true",
                   help="show a progress bar with bytes/s on stderr while streaming (default: only when "
                        "stderr is a terminal)")
    p.set_defaults(func=cmd_upscale)

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
        with sigterm_raises():
            status = int(args.func(args))
            sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return status
    except GraphscaleError as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"graphscale: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `graphscale explain gpt | head`: the reader left; stop quietly like other tools
        _silence_stdout()
        return EXIT_SIGPIPE
    except Terminated:
        print("graphscale: terminated by SIGTERM; any partial output was removed", file=sys.stderr)
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        print("graphscale: interrupted; any partial output was removed", file=sys.stderr)
        return EXIT_INTERRUPT


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not raise BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a file descriptor
        pass


if __name__ == "__main__":
    sys.exit(main())
