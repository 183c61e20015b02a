"""Default recipes: one per (system, preset), the width rule for other shapes, flags on top."""

import math

import pytest

from bitnet.config import PRESETS, BitNetConfig
from bitnet.train.recipes import RECIPES, Recipe, default_recipe, lr_for_width, preset_of
from bitnet.train.trainer import TrainConfig


def test_every_system_has_a_recipe_at_every_preset():
    for linear in ("bitnet", "bitnet1", "bf16"):
        assert set(RECIPES[linear]) == set(PRESETS)
        for preset, r in RECIPES[linear].items():
            assert r.lr > 0 and r.source, (linear, preset)
            assert r.schedule == ("cosine" if linear == "bf16" else "two-stage")
    # the published large-size recipes (the training FAQ's Table 2, both systems): BitNet's peak is
    # several times the twin's; 1.3B and 3B share 1.2e-3 -> 8e-4 and the twin's 2e-4
    faq = {"700m": (1.5e-3, 1e-3, 2.5e-4), "1.3b": (1.2e-3, 8e-4, 2e-4), "3b": (1.2e-3, 8e-4, 2e-4)}
    for preset, (peak, stage2, twin) in faq.items():
        b, t = RECIPES["bitnet"][preset], RECIPES["bf16"][preset]
        assert (b.lr, b.stage2_ratio * b.lr, t.lr) == pytest.approx((peak, stage2, twin)), preset
        assert (b.weight_decay, b.weight_decay_stage2, t.weight_decay) == (0.1, 0.0, 0.1)
        assert b.warmup_steps == t.warmup_steps == 375 and (b.beta1, b.beta2) == (t.beta1, t.beta2) == (0.9, 0.95)


def test_warmup_is_the_published_count_capped_at_five_percent():
    faq, swept = RECIPES["bitnet"]["700m"], RECIPES["bitnet"]["tiny"]
    assert faq.warmup_for(100_000) == 375  # the FAQ's runs: 100B tokens at 1M-token batches
    assert faq.warmup_for(1_000) == 50 and faq.warmup_for(10) == 1  # short runs: 5%, at least one step
    assert swept.warmup_steps is None and swept.warmup_for(300) == math.floor(300 * swept.warmup_fraction)
    assert Recipe(lr=1e-3, schedule="cosine").warmup_for(300) == 15  # the fraction unless a recipe sets one: 5%
    # a swept per-system fraction (20%, say) sets the count, and caps a published one
    assert Recipe(lr=1e-3, schedule="cosine", warmup_fraction=0.2).warmup_for(300) == 60
    assert Recipe(lr=1e-3, schedule="cosine", warmup_fraction=0.2, warmup_steps=375).warmup_for(1_000) == 200
    assert Recipe(lr=1e-3, schedule="cosine", warmup_fraction=0.2).warmup_for(4) == 1


def test_width_rule_for_custom_shapes():
    for linear in RECIPES:
        for preset in PRESETS:  # the rule passes through its anchors
            assert lr_for_width(linear, PRESETS[preset]["hidden_size"]) == pytest.approx(RECIPES[linear][preset].lr)
        big = max(p["hidden_size"] for p in PRESETS.values())
        assert lr_for_width(linear, 2 * big) == pytest.approx(lr_for_width(linear, big) / 2)  # 1/width beyond
    config = BitNetConfig.from_preset("small", hidden_size=320, intermediate_size=864, num_attention_heads=5,
                                      num_key_value_heads=5)
    assert preset_of(config) is None and preset_of(BitNetConfig.from_preset("base")) == "base"
    r = default_recipe("bf16", config)
    lo, hi = sorted((RECIPES["bf16"]["small"].lr, RECIPES["bf16"]["base"].lr))
    assert lo * (1 - 1e-12) <= r.lr <= hi * (1 + 1e-12) and "width rule" in r.source  # exp(log(x)) rounds


def test_flags_override_the_recipe():
    cfg = TrainConfig(data="x", out="y", preset="tiny", linear="bf16", lr=1e-3, beta2=0.99)
    r = cfg.resolve_recipe()
    assert (r.lr, r.beta2, r.schedule) == (1e-3, 0.99, "cosine") and "set by flags: beta2, lr" in r.source
    assert TrainConfig(data="x", out="y", preset="small").resolve_recipe() == RECIPES["bitnet"]["small"]
