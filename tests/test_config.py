"""The one config system: --set typed by annotation, dotted keys, clear errors; --seed."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from explore_persona_space.config import ConfigError, apply_overrides, settable_keys, with_seed


@dataclasses.dataclass(frozen=True)
class Inner:
    learning_rate: float = 1e-5
    mode: Literal["a", "b"] = "a"
    seed: int = 42

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")


@dataclasses.dataclass(frozen=True)
class Outer:
    seed: int = 42
    epochs: float = 20  # written as an int: the annotation, not the value, decides
    n: int = 3
    flag: bool = False
    name: str = "x"
    maybe: int | None = None
    targets: tuple[str, ...] = ("q", "k")
    train: Inner = dataclasses.field(default_factory=Inner)


def test_values_are_parsed_by_the_annotation():
    cfg = apply_overrides(
        Outer(),
        ["epochs=2.5", "n=7", "flag=true", "name=y", "maybe=4", "targets=q_proj, v_proj"],
    )
    assert (cfg.epochs, cfg.n, cfg.flag, cfg.name, cfg.maybe) == (2.5, 7, True, "y", 4)
    assert cfg.targets == ("q_proj", "v_proj")
    assert apply_overrides(cfg, ["maybe=none"]).maybe is None
    assert isinstance(apply_overrides(Outer(), ["epochs=5"]).epochs, float)


def test_dotted_keys_reach_nested_fields_and_later_wins():
    cfg = apply_overrides(Outer(), ["train.learning_rate=3e-5", "train.mode=b", "n=1", "n=2"])
    assert cfg.train == Inner(learning_rate=3e-5, mode="b") and cfg.n == 2
    assert Outer().train.learning_rate == 1e-5  # frozen: the default is untouched


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("n=2.5", "'2.5' is not a valid int"),
        ("flag=maybe", "not a valid bool"),
        ("lr", "KEY=VALUE"),
        ("depth=3", "unknown key 'depth'; valid keys: seed, epochs, n, flag, name, maybe, targets, train."),
        ("train.depth=3", "unknown key 'train.depth'; valid keys: train.learning_rate, train.mode"),
        ("train=3", "'train' is a group; set one of its fields: train.learning_rate, train.mode"),
        ("n.x=3", "'n' has no fields"),
        ("train.mode=c", "'c' is not a valid one of a, b"),
        ("train.seed=7", "nested seeds derive from the top-level seed"),
        ("train.learning_rate=-1", "learning_rate must be > 0"),
    ],
)
def test_bad_overrides_say_what_is_wrong(item, message):
    with pytest.raises(ConfigError) as exc:
        apply_overrides(Outer(), [item])
    assert message in str(exc.value)


def test_settable_keys_flatten_and_hide_nested_seeds():
    keys = settable_keys(Outer())
    assert keys == [
        "seed",
        "epochs",
        "n",
        "flag",
        "name",
        "maybe",
        "targets",
        "train.learning_rate",
        "train.mode",
    ]


def test_with_seed():
    assert with_seed(Outer(), 137).seed == 137 and with_seed(Outer(), None) == Outer()
    with pytest.raises(ConfigError, match="no 'seed' field"):
        with_seed(dataclasses.make_dataclass("NoSeed", [("n", int, 1)])(), 1)
