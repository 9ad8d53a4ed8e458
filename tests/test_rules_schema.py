"""Rule files are validated when they load: every mistake is a RuleError naming file, rule and key."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from graphscale.errors import GraphscaleError, RuleError
from graphscale.infer.rulebook import RuleBook

GOOD_LINEAR = """
[[rule]]
name = "my_linear"
kind = "einsum"
targets = ["torch.nn.functional.linear"]
operands = ["input", "weight", "bias"]
pattern = "... i, o i, o -> ... o"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent(text))
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(RuleError) as info:
        RuleBook.load(path)
    message = str(info.value)
    assert str(path) in message, message
    return message


def test_a_good_user_rule_loads_and_overrides(tmp_path: Path) -> None:
    book = RuleBook.load(_write(tmp_path, GOOD_LINEAR))
    import torch

    rule = book.lookup_function(torch.nn.functional.linear)
    assert rule is not None and rule.name == "my_linear"
    assert rule.get("pattern").output == ("...", "o")  # parsed once, at load


def test_misspelled_key_suggests_the_close_match(tmp_path: Path) -> None:
    message = _error(tmp_path, """
        [[rule]]
        name = "pool_it"
        kind = "pool"
        spatail = 1
        targets = ["torch.nn.functional.avg_pool1d"]
        """)
    assert "rule 'pool_it'" in message and "'spatail'" in message and "did you mean 'spatial'" in message


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    message = _error(tmp_path, """
        [[rule]]
        name = "pool_it"
        kind = "pool"
        spatial = "two"
        targets = ["torch.nn.functional.avg_pool1d"]
        """)
    assert "rule 'pool_it'" in message and "key 'spatial'" in message and "integer" in message


@pytest.mark.parametrize("pattern, problem", [
    ("... i, o i, o", "'->'"),
    ("... i, o i -> ... o", "operands"),
    ("... i, o i, o -> ... z", "appear in no operand"),
    ("... i, o i, o -> -> o", "'->'"),
])
def test_malformed_pattern(tmp_path: Path, pattern: str, problem: str) -> None:
    message = _error(tmp_path, GOOD_LINEAR.replace('"... i, o i, o -> ... o"', f'"{pattern}"'))
    assert "rule 'my_linear'" in message and problem in message
    assert "key 'pattern'" in message or "key 'operands'" in message


def test_missing_pattern(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD_LINEAR.replace('pattern = "... i, o i, o -> ... o"', ""))
    assert "rule 'my_linear'" in message and "key 'pattern' is missing" in message


@pytest.mark.parametrize("target", ["torch.no_such_function", "aten.no_such_op.default",
                                    "module:torch.nn.NoSuchModule", "operator.nope"])
def test_unresolvable_target(tmp_path: Path, target: str) -> None:
    message = _error(tmp_path, GOOD_LINEAR.replace('"torch.nn.functional.linear"', f'"{target}"'))
    assert "rule 'my_linear'" in message and "key 'targets'" in message and target in message


def test_optional_targets_may_be_absent_explicitly(tmp_path: Path) -> None:
    book = RuleBook.load(_write(tmp_path, GOOD_LINEAR + 'optional_targets = ["aten.no_such_op.default"]\n'))
    assert book.unresolved == ["aten.no_such_op.default"]


def test_unknown_kind_and_missing_kind(tmp_path: Path) -> None:
    assert "did you mean 'einsum'" in _error(tmp_path, GOOD_LINEAR.replace('"einsum"', '"einsun"'))
    assert "key 'kind' is missing" in _error(tmp_path, GOOD_LINEAR.replace('kind = "einsum"', ""))


def test_bad_reference_and_letters(tmp_path: Path) -> None:
    assert "key 'operands'" in _error(tmp_path, GOOD_LINEAR.replace('"bias"]', '"bias@x"]'))
    message = _error(tmp_path, GOOD_LINEAR + 'index = ["v"]\n')
    assert "key 'index'" in message and "'v'" in message


def test_rule_errors_are_graphscale_errors() -> None:
    assert issubclass(RuleError, GraphscaleError)


def test_builtin_rules_use_names_not_positions() -> None:
    book = RuleBook.load()
    for rule in book.rules:
        for value in rule.spec.values():
            refs = value if isinstance(value, tuple) else (value,)
            for ref in refs:
                assert getattr(ref, "pos", None) is None, f"{rule.source}: {rule.name} reads {ref}"


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    bad = _write(tmp_path, GOOD_LINEAR.replace('"... i, o i, o -> ... o"', '"... i, o i, o"'))
    proc = subprocess.run([sys.executable, "-m", "graphscale", "explain", "mlp", "--rules", str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "my_linear" in lines[0] and "pattern" in lines[0], proc.stderr


def test_a_target_outside_torch_is_not_imported(tmp_path: Path) -> None:
    """``targets = ["this.f"]`` must not import ``this`` (importing it prints the Zen of Python)."""
    rule = _write(tmp_path, '[[rule]]\nname = "zen"\nkind = "elementwise"\ntargets = ["this.f"]\n')
    code = textwrap.dedent(f"""
        import sys
        from graphscale.errors import RuleError
        from graphscale.infer.rulebook import RuleBook
        assert "this" not in sys.modules
        try:
            RuleBook.load({str(rule)!r})
        except RuleError as e:
            assert "this.f" in str(e) and "allow_imports" in str(e), e
        else:
            raise SystemExit("no RuleError")
        assert "this" not in sys.modules
        print("REFUSED")
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "REFUSED", proc.stdout + proc.stderr


def test_allow_imports_opts_in(tmp_path: Path) -> None:
    rule = _write(tmp_path, '[[rule]]\nname = "c"\nkind = "elementwise"\ntargets = ["colorsys.rgb_to_hsv"]\n')
    code = textwrap.dedent(f"""
        import sys
        from graphscale.errors import RuleError
        from graphscale.infer.rulebook import RuleBook
        sys.modules.pop("colorsys", None)  # as if nothing had imported it
        try:
            RuleBook.load({str(rule)!r})
        except RuleError:
            pass
        else:
            raise SystemExit("no RuleError")
        book = RuleBook.load({str(rule)!r}, allow_imports=True)
        print(book.rules[-1].name, "colorsys" in sys.modules)
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "c True", proc.stdout + proc.stderr


def test_legacy_name_at_position_references_still_load(tmp_path: Path) -> None:
    book = RuleBook.load(_write(tmp_path, GOOD_LINEAR.replace('["input", "weight", "bias"]',
                                                             '["input@0", "weight@1", "bias@2"]')))
    assert [r.pos for r in book.rules[-1].get("operands")] == [0, 1, 2]


def test_builtin_targets_that_read_arguments_have_a_readable_signature() -> None:
    """Names only work where the signature can be read: every built-in target of a kind that reads
    arguments has one (so no built-in rule falls back to guessing positions)."""
    import torch

    from graphscale.infer.call import _function_candidates, _method_candidates

    positional_free = {"elementwise", "fixed", "ignore"}  # these read every argument, by no name
    book = RuleBook.load()
    missing = [f"{rule.name}: {fn}" for fn, rule in book.functions.items()
               if rule.kind not in positional_free and not isinstance(fn, torch._ops.OpOverloadPacket)
               and not _function_candidates(fn)]
    missing += [f"{rule.name}: method:{m}" for m, rule in book.methods.items()
                if rule.kind not in positional_free and not _method_candidates(m)]
    assert not missing, missing
