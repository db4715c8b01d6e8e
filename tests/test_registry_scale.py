"""A big registry loads, and reading YAML with libyaml changed none of what a bad file is told (duplicate keys,
syntax errors: file, line and wording as under PyYAML's own parser). How fast it loads is bench.registry's
business, never asserted here."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from app.errors import RegistryError
from app.registry import load
from app.registry.load import load_registry, parse_registry
from bench.big_registry import big_registry, write_big_registry
from tests.support.registries import GOOD_REGISTRY

needs_libyaml = pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML built without libyaml")


@pytest.fixture(params=["libyaml", "pure"])
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test twice: with the loader in use (libyaml's) and with the pure-Python fallback."""
    if request.param == "libyaml":
        if not yaml.__with_libyaml__:
            pytest.skip("PyYAML built without libyaml")
    else:
        monkeypatch.setattr(load, "_Loader", load._PureLoader)
    return str(request.param)


@needs_libyaml
def test_libyaml_reads_the_registry_when_present() -> None:
    assert issubclass(load._Loader, yaml.CSafeLoader)
    assert not issubclass(load._PureLoader, yaml.CSafeLoader)


def _line_of(text: str, snippet: str, nth: int = 1) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if snippet in line]
    return lines[nth - 1]


@pytest.mark.usefixtures("loader")
def test_a_duplicate_feature_is_refused_with_its_line() -> None:
    text = GOOD_REGISTRY.replace("      embedding:", "      orders_7d: {dtype: float64}\n      embedding:", 1)
    with pytest.raises(RegistryError) as caught:
        parse_registry(text, "registry.yaml", env={})
    line = _line_of(text, "orders_7d:", 2)
    assert str(caught.value) == f"registry.yaml: line {line}: duplicate key 'orders_7d'"


@pytest.mark.usefixtures("loader")
def test_a_duplicate_deep_in_a_big_registry_is_refused_with_its_line() -> None:
    text = big_registry(60, 20)
    marker = "  group_0042:\n"
    text = text.replace(marker, marker.replace("42", "41"), 1)  # a second group_0041, 20 lines after the first
    with pytest.raises(RegistryError) as caught:
        parse_registry(text, "big.yaml", env={})
    assert str(caught.value) == f"big.yaml: line {_line_of(text, 'group_0041:', 2)}: duplicate key 'group_0041'"


@pytest.mark.usefixtures("loader")
def test_duplicate_keys_in_flow_mappings_and_backends_are_refused_too() -> None:
    text = GOOD_REGISTRY.replace("{dtype: int64, default: 0}", "{dtype: int64, default: 0, dtype: string}", 1)
    line = _line_of(text, "dtype: string")
    with pytest.raises(RegistryError, match=rf"^r.yaml: line {line}: duplicate key 'dtype'$"):
        parse_registry(text, "r.yaml", env={})
    text = GOOD_REGISTRY.replace("entities:", "  hot: {type: sqlite, path: /tmp/x.sqlite}\nentities:", 1)
    with pytest.raises(RegistryError, match=rf"^r.yaml: line {_line_of(text, 'hot:', 2)}: duplicate key 'hot'$"):
        parse_registry(text, "r.yaml", env={})


RICH_YAML = """
base: &base {dtype: float64, default: 0.5, tags: [a, b]}
names: [&name plain, *name, "quoted", 'single', null, ~, true, no, 1_000, 0x1f, 1.5e3, .inf, 2026-11-30, "2026-11-30"]
when: 2026-11-30T10:00:00Z
blob: !!binary aGVsbG8=
again: *base
multi: |
  two
  lines
folded: >
  one
  line
"""


@pytest.mark.parametrize("text", [RICH_YAML, GOOD_REGISTRY, big_registry(20, 14)], ids=["rich", "good", "big"])
def test_our_loaders_read_what_safe_load_reads(text: str) -> None:
    """The duplicate-key hook and the plain-string shortcut leave the document as yaml.safe_load makes it."""
    expected = yaml.safe_load(text)
    assert yaml.load(text, Loader=load._PureLoader) == expected  # noqa: S506 (a SafeLoader subclass)
    assert yaml.load(text, Loader=load._Loader) == expected  # noqa: S506 (a SafeLoader or CSafeLoader subclass)


SYNTAX_ERRORS = [
    # (what replaces "ttl: 1h" in GOOD_REGISTRY, the line named: that of `ttl: 1h` + offset; None: the last)
    pytest.param("ttl: [1h", 1, id="unclosed-flow-sequence"),
    pytest.param("ttl: 1h\n     bad: indent", 1, id="bad-indentation"),
    pytest.param("ttl: 1h\n\t- tab", 1, id="tab"),
    pytest.param("ttl: *nowhere", 0, id="undefined-alias"),
    pytest.param("ttl: 'unterminated", None, id="unterminated-quote"),
    pytest.param("ttl: a: b", 0, id="mapping-in-a-plain-scalar"),
    pytest.param("ttl: !!python/object:os.system x", 0, id="unsafe-tag"),
]


@pytest.mark.parametrize(("new", "offset"), SYNTAX_ERRORS)
def test_a_yaml_syntax_error_names_the_line(loader: str, new: str, offset: int | None) -> None:
    text = GOOD_REGISTRY.replace("ttl: 1h", new, 1)
    with pytest.raises(RegistryError) as caught:
        parse_registry(text, "registry.yaml", env={})
    line = text.count("\n") + 1 if offset is None else _line_of(GOOD_REGISTRY, "ttl: 1h") + offset
    assert caught.value.path == f"line {line}", str(caught.value)


@needs_libyaml
@pytest.mark.parametrize("new", [pytest.param(p.values[0], id=p.id) for p in SYNTAX_ERRORS])
def test_a_yaml_syntax_error_reads_as_pyyamls_own(new: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """libyaml words some errors more vaguely; the message a user gets is still PyYAML's."""
    text = GOOD_REGISTRY.replace("ttl: 1h", new, 1)
    with pytest.raises(RegistryError) as fast:
        parse_registry(text, "registry.yaml", env={})
    monkeypatch.setattr(load, "_Loader", load._PureLoader)
    with pytest.raises(RegistryError) as pure:
        parse_registry(text, "registry.yaml", env={})
    assert str(fast.value) == str(pure.value)


def test_the_generated_registry_loads_with_20000_features(tmp_path: Path) -> None:
    text = write_big_registry(tmp_path / "big.yaml").read_text()
    assert 21_000 < text.count("\n") < 24_000  # the registry is about 22,000 lines
    registry = load_registry(tmp_path / "big.yaml", env={})
    assert len(registry.groups) == 400
    features = [f for g in registry.groups.values() for f in g.features]
    assert len(features) == 20_000
    assert all(len(g.features) == 50 for g in registry.groups.values())
    kinds = Counter(f.dtype.kind for f in features)
    assert set(kinds) == {"int64", "float64", "bool", "string", "bytes", "array"}
    assert {f.dtype.name for f in features if f.dtype.kind == "array"} == {"float32[8]", "float64[4]", "int64[3]"}
    assert sum(f.default is not None for f in features) > 10_000
    assert {g.backend for g in registry.groups.values()} == {"hot", "bulk", "archive"}
    assert {g.entity.name for g in registry.groups.values()} == {"consumer", "store", "courier"}
    assert registry.backends["hot"].options["path"] == f"{tmp_path}/hot.sqlite"
    group = registry.groups["group_0000"]
    assert group.ttl_s == 3600
    assert group.by_name["f09_float64_4"].default == [0.0, 0.0, 0.0, 0.0]
    assert group.description.startswith("Generated group 0")


def test_the_generated_registry_on_servers_loads() -> None:
    registry = parse_registry(big_registry(servers=True), "big.yaml", env={"BENCH_PG_DSN": "postgresql://u@db/x"})
    assert sum(len(g.features) for g in registry.groups.values()) == 20_000
    assert registry.backends["hot"].type == "redis"
    assert registry.backends["bulk"].options["dsn"] == "postgresql://u@db/x"


def test_check_counts_the_generated_registry(tmp_path: Path) -> None:
    path = write_big_registry(tmp_path / "big.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "app", "check", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "ok: 3 backends, 3 entities, 400 groups, 20000 features" in result.stdout


def test_reading_the_same_file_again_gives_the_same_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """serve reads the file twice in one process; the second reading is the first's registry, under the
    path it was given this time, as long as the text and the variables it names are unchanged."""
    path = tmp_path / "registry.yaml"
    path.write_text(GOOD_REGISTRY)
    first = load_registry(path, env={"REDIS_URL": "redis://a:6379/0", "UNRELATED": "1"})
    again = load_registry(path, env={"REDIS_URL": "redis://a:6379/0", "UNRELATED": "2"})
    assert again is first
    monkeypatch.chdir(tmp_path)
    relative = load_registry("registry.yaml", env={"REDIS_URL": "redis://a:6379/0"})
    assert relative.source == "registry.yaml"
    assert relative.groups is first.groups
    other_value = load_registry(path, env={"REDIS_URL": "redis://b:6379/0"})
    assert other_value.backends["hot"].options["url"] == "redis://b:6379/0"
    path.write_text(GOOD_REGISTRY.replace("ttl: 1h", "ttl: 2h"))
    changed = load_registry(path, env={"REDIS_URL": "redis://b:6379/0"})
    assert changed.groups["live"].ttl_s == 7200


def test_the_collector_is_back_after_reading_good_and_bad_registries() -> None:
    assert gc.isenabled()
    parse_registry(GOOD_REGISTRY, "r.yaml", env={})
    assert gc.isenabled()
    with pytest.raises(RegistryError):
        parse_registry(GOOD_REGISTRY.replace("ttl: 1h", "ttl: soon"), "r.yaml", env={})
    assert gc.isenabled()
    gc.disable()
    try:
        parse_registry(GOOD_REGISTRY, "r.yaml", env={})
        assert not gc.isenabled()  # whoever turned it off turns it back on
    finally:
        gc.enable()
