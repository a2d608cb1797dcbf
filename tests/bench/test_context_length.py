"""The context-length bench's Transformer baseline and measurements: the KV-cache decode path
agrees with the full causal forward pass, the cache grows linearly with the context while the
SSM state does not, and the baseline's size matches the SSM's."""

from __future__ import annotations

import torch

from bench._report import append_section
from bench._transformer_baseline import DecoderConfig, TransformerDecoder
from bench.context_length import (
    HEADING,
    matched_decoder,
    measure,
    parameter_count,
    selective_lm,
    ssm_run,
    transformer_run,
)

# float32 attention computed over a different number of keys at a time: rounding only.
FLOAT32_AGREEMENT = 1e-5


def test_cached_decode_agrees_with_the_full_causal_forward() -> None:
    torch.manual_seed(0)
    model = TransformerDecoder(DecoderConfig(vocab_size=11, d_model=16, n_heads=2)).eval()
    tokens = torch.randint(0, 11, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = model(tokens)  # [3, 20, 11]
        cache = model.new_cache(3, capacity=20)
        prefilled = model(tokens[:, :7], cache)  # [3, 7, 11]
        stepped = [model.step(tokens[:, t], cache) for t in range(7, 20)]  # 13 x [3, 11]
    torch.testing.assert_close(prefilled, reference[:, :7], atol=FLOAT32_AGREEMENT, rtol=0)
    torch.testing.assert_close(
        torch.stack(stepped, dim=1), reference[:, 7:], atol=FLOAT32_AGREEMENT, rtol=0
    )
    assert cache.length == 20


def test_ssm_state_is_flat_while_the_kv_cache_grows_linearly() -> None:
    ssm = selective_lm()
    decoder = matched_decoder(parameter_count(ssm), n_layers=ssm.config.n_layers)
    assert abs(parameter_count(decoder) - parameter_count(ssm)) < 0.1 * parameter_count(ssm)
    next_tokens = torch.zeros(2, 1, dtype=torch.long)
    sizes = {}
    with torch.inference_mode():
        for length in (8, 32):
            context = torch.randint(0, decoder.config.vocab_size, (1, length))
            sizes[length] = (
                ssm_run(ssm, context, next_tokens).state_bytes,
                transformer_run(decoder, context, next_tokens).state_bytes,
            )
    assert sizes[8][0] == sizes[32][0]
    cfg = decoder.config
    for length, (_, cache_bytes) in sizes.items():
        assert cache_bytes == 2 * cfg.n_layers * length * cfg.d_model * 4  # keys + values, fp32


def test_append_section_keeps_what_the_file_had(tmp_path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Sessions\n\nrows")
    append_section(path, HEADING, "| a |\n|---|", "python bench/context_length.py")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\n## Sessions\n\nrows\n\n## Context length\n\n")
    assert text.endswith("| a |\n|---|\n")


def test_measure_reports_every_context_with_positive_times() -> None:
    rows, models = measure([4, 16], steps=2, repeats=1, threads=1)
    assert [row["context"] for row in rows] == [4, 16]
    assert all(row["ssm"]["seconds"] > 0 and row["transformer"]["seconds"] > 0 for row in rows)
    assert rows[1]["transformer"]["macs"] > rows[0]["transformer"]["macs"]
    assert models["ssm_parameters"] == parameter_count(selective_lm())


def test_fused_decode_step_agrees_with_the_reference_step() -> None:
    torch.manual_seed(0)
    model = TransformerDecoder(DecoderConfig(vocab_size=11, d_model=24, n_heads=4)).eval()
    tokens = torch.randint(0, 11, (2, 30), generator=torch.Generator().manual_seed(2))
    fused, reference = model.new_cache(2, capacity=30), model.new_cache(2, capacity=30)
    with torch.inference_mode():
        model(tokens[:, :5], fused)
        model(tokens[:, :5], reference)
        for t in range(5, 30):
            torch.testing.assert_close(
                model.step(tokens[:, t], fused),
                model.step_reference(tokens[:, t], reference),
                atol=FLOAT32_AGREEMENT,
                rtol=FLOAT32_AGREEMENT,
            )
    for a, b in zip(fused.keys + fused.values, reference.keys + reference.values, strict=True):
        torch.testing.assert_close(a, b, atol=FLOAT32_AGREEMENT, rtol=FLOAT32_AGREEMENT)
