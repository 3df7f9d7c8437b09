"""The standard few-shot baselines: each formula on hand-made tensors against an independent
re-implementation, validation-only selection, and every recipe end to end through run_shell.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_trainers import build_everything

from fewclip.cache_model import (
    CacheModel,
    average_view_keys,
    build_search_grid,
    compute_tip_logits,
    search_alpha_beta,
)
from fewclip.config import build_config
from fewclip.run import execute_run

ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC = ROOT / "configs" / "datasets" / "synthetic.yaml"
RECIPES = ROOT / "configs" / "trainers"


# ----- Tip-Adapter ------------------------------------------------------------------------------
def test_tip_logits_match_the_papers_formula_written_out():
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    keys = F.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    text = F.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    values = torch.eye(3)[labels]
    alpha, beta = 1.7, 5.5
    expected = torch.zeros(5, 3)
    for n in range(5):  # element by element: 100 f.w_c + alpha sum_k exp(-beta (1 - f.k)) L_kc
        for c in range(3):
            cache = sum(
                math.exp(-beta * (1 - float(features[n] @ keys[k]))) * float(values[k, c])
                for k in range(6)
            )
            expected[n, c] = 100 * float(features[n] @ text[c]) + alpha * cache
    got = compute_tip_logits(100 * features @ text.t(), features @ keys.t(), values, alpha, beta)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    cache = CacheModel(8, 3, alpha, beta, trainable=False)
    cache.fill(keys, values)
    torch.testing.assert_close(
        cache(features, 100 * features @ text.t()), expected, atol=1e-4, rtol=1e-5
    )


def test_keys_average_the_raw_views_before_normalising():
    views = torch.tensor([[[3.0, 0.0]], [[0.0, 1.0]]])  # one image, two views of unequal norm
    expected = torch.tensor([[1.5, 0.5]]) / math.hypot(1.5, 0.5)
    torch.testing.assert_close(average_view_keys(views), expected)


def test_search_grid_is_the_sources():
    assert build_search_grid(13, 20) == [i * 12.9 / 20 + 0.1 for i in range(20)]
    assert build_search_grid(7, 200)[0] == pytest.approx(0.1)
    assert build_search_grid(7, 200)[-1] == pytest.approx(199 * 6.9 / 200 + 0.1)


def reference_search(clip_logits, affinity, values, labels, betas, alphas):
    """The source's loop (utils.py:109-125), written out: accuracy, strict improvement."""
    best_acc, best = 0.0, (0, 0)
    for beta in betas:
        for alpha in alphas:
            logits = clip_logits + ((-1) * (beta - beta * affinity)).exp() @ values * alpha
            acc = 100.0 * float((logits.argmax(1) == labels).float().sum()) / len(labels)
            if acc > best_acc:
                best_acc, best = acc, (beta, alpha)
    return best, best_acc


def test_search_on_a_toy_cache_finds_the_sources_pair():
    # zero-shot text is wrong for class 1; only a large enough alpha lets the cache fix it
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    values = torch.eye(2)
    text = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    features = F.normalize(torch.tensor([[1.0, 0.1], [0.5, 1.0], [0.3, 1.0]]), dim=-1)
    labels = torch.tensor([0, 1, 1])
    clip_logits = 100 * features @ text.t()
    clip_logits[1:, 1] -= 30  # text alone calls both class-1 images class 0
    betas, alphas = build_search_grid(7, 10), build_search_grid(60, 12)
    beta, alpha, score = search_alpha_beta(
        clip_logits, features @ keys.t(), values, labels, betas, alphas
    )
    (ref_beta, ref_alpha), ref_acc = reference_search(
        clip_logits, features @ keys.t(), values, labels, betas, alphas
    )
    assert (beta, alpha) == (ref_beta, ref_alpha) and score == pytest.approx(ref_acc / 100)
    assert score == 1.0 and alpha > alphas[0]  # the search moved off the first pair
    zero_shot = (clip_logits.argmax(1) == labels).float().mean()
    assert zero_shot < 1.0


def small_opts(tmp_path: Path, shared_cache: Path) -> list[str]:
    return [
        "OUTPUT_DIR", str(tmp_path / "out"), "CACHE_DIR", str(shared_cache),
        "MODEL.NAME", "tiny-vit", "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "12",
        "DATASET.NUM_SHOTS", "2", "DATASET.VAL_SHOTS", "2", "EVAL.BATCH_SIZE", "64",
    ]  # fmt: skip


@pytest.mark.parametrize("recipe", ["tip_adapter.yaml", "tip_adapter_f.yaml"])
def test_alpha_and_beta_are_searched_on_validation_only(
    recipe, tmp_path, shared_cache, monkeypatch
):
    """The search sees the validation images and labels and nothing else: if it were handed the
    test split (or the training shots), its inputs would differ in size or labels."""
    import fewclip_trainers.tip_adapter as tip

    seen = []

    def spy(clip_logits, affinity, values, labels, betas, alphas, metric="accuracy"):
        seen.append((clip_logits.clone(), labels.cpu().numpy().copy()))
        return search_alpha_beta(clip_logits, affinity, values, labels, betas, alphas, metric)

    monkeypatch.setattr(tip, "search_alpha_beta", spy)
    opts = [*small_opts(tmp_path, shared_cache), "OPTIM.MAX_ITERS", "2"]
    cfg = build_config(RECIPES / recipe, SYNTHETIC, opts)
    results = execute_run(cfg)
    assert results["status"] == "complete", results.get("error")
    ((clip_logits, labels),) = seen
    assert len(labels) == results["split"]["num_val"] == 2 * 4  # VAL_SHOTS x classes
    assert results["metrics"]["test"]["num_samples"] != len(labels)
    training = results["training"]
    assert training["searched"] and training["alpha"] in build_search_grid(13, 20)
    assert training["beta"] in build_search_grid(13, 200)


# ----- the Dassl epoch schedule (CoOp line) ------------------------------------------------------
def test_epochs_follow_coops_configs_by_shots():
    from fewclip.epoch_schedule import epochs_for_shots, iterations_per_epoch

    table = ([1, 2, 4, 8, 16], [50, 100, 100, 200, 200])
    assert [epochs_for_shots(*table, k) for k in (1, 2, 3, 4, 8, 16, 32)] == [
        50, 100, 100, 100, 200, 200, 200,
    ]  # fmt: skip
    # Dassl drops the last short batch once the set holds a batch (data_manager.py:43)
    assert [iterations_per_epoch(n, 32) for n in (4, 31, 32, 63, 64, 100)] == [1, 1, 1, 1, 2, 3]


def test_constant_warmup_then_cosine(fast_opts):
    from fewclip.hooks import FitContext, LearningRateHook
    from fewclip_trainers.clip_adapter import CLIPAdapter

    opts = [*fast_opts, "OPTIM.MAX_ITERS", "0", "OPTIM.BATCH_SIZE", "32"]
    cfg = build_config(RECIPES / "clip_adapter.yaml", SYNTHETIC, opts)
    trainer = CLIPAdapter.__new__(CLIPAdapter)  # the schedule needs only cfg, node and N
    trainer.cfg, trainer.node, trainer.num_train = cfg, cfg.TRAINER.CLIPADAPTER, 8
    total = trainer.num_iterations()
    assert total == 100  # 2 shots -> 100 epochs of one batch
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ctx = FitContext(trainer, None, None, None, optimizer, None, [], total)
    lrs = []
    for step in range(total):
        ctx.step = step
        LearningRateHook().before_step(ctx)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == 1e-5  # one epoch at Dassl's WARMUP_CONS_LR
    expected = [2e-3 * 0.5 * (1 + math.cos(math.pi * (t - 1) / 99)) for t in range(1, total)]
    np.testing.assert_allclose(lrs[1:], expected, rtol=1e-9, atol=1e-12)


# ----- CLIP-Adapter ------------------------------------------------------------------------------
def test_clip_adapter_blend_and_scale_invariance():
    from fewclip_trainers.clip_adapter import FeatureAdapter, blend_adapted

    torch.manual_seed(0)
    adapter = FeatureAdapter(8, 4)
    raw = torch.randn(5, 8) * 3.0
    w1, w2 = adapter.fc[0].weight, adapter.fc[2].weight
    by_hand = torch.relu(torch.relu(raw @ w1.t()) @ w2.t())  # bias-free, ReLU after each layer
    torch.testing.assert_close(adapter(raw), by_hand)
    source = 0.2 * by_hand + 0.8 * raw  # clip_adapter.py:104-105 on raw features, then normalise
    source = source / source.norm(dim=-1, keepdim=True)
    unit = F.normalize(raw, dim=-1)  # fewclip reads the cached unit-norm features
    torch.testing.assert_close(blend_adapted(unit, adapter(unit), 0.2), source)
    assert w1.shape == (2, 8) and w2.shape == (8, 2)


# ----- CoOp ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip():
    from fewclip.backbones import build_clip
    from fewclip.config import get_cfg_defaults

    cfg = get_cfg_defaults()
    cfg.MODEL.NAME = "tiny-vit"
    return build_clip(cfg.MODEL)


NAMES = ["normal", "squamous cell carcinoma"]  # one word; several BPE tokens


@pytest.mark.parametrize(
    "position, template",
    [
        ("end", "one two three four {}."),
        ("middle", "one two {} three four."),
        ("front", "{} one two three four."),
    ],
)
def test_prompt_assembly_gives_the_expected_token_sequence(tiny_clip, position, template):
    from fewclip.prompt_learning import PromptLearner, embed_tokens

    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    learner = PromptLearner(model, tokenizer, NAMES, 4, "", False, position)
    with torch.no_grad():  # the context = the embeddings of four words
        learner.ctx.copy_(embed_tokens(model, tokenizer(["one two three four"]))[0, 1:5])
        expected = embed_tokens(model, tokenizer([template.format(n) for n in NAMES]))
    assert learner.name_lengths[0] == 1 and learner.name_lengths[1] > 1
    torch.testing.assert_close(learner(), expected)


def test_initialised_context_reproduces_the_hand_written_prompt(tiny_clip):
    from fewclip.prompt_learning import PromptLearner, encode_prompt_embeddings

    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    for csc in (False, True):
        learner = PromptLearner(model, tokenizer, NAMES, 16, "a photo of a", csc, "end")
        assert learner.ctx.shape == ((2, 4, 64) if csc else (4, 64))
        with torch.no_grad():
            got = encode_prompt_embeddings(model, learner(), learner.tokens)
            expected = model.encode_text(tokenizer([f"a photo of a {n}." for n in NAMES]))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gradient_reaches_the_context_through_the_frozen_text_tower(fast_opts):
    from fewclip_trainers.coop import CoOp

    *_, trainer, _, _, _ = build_everything("CoOp", fast_opts)
    assert isinstance(trainer, CoOp) and trainer.prompt_learner.ctx.shape == (16, 64)
    trainer.compute_class_text().pow(2).sum().backward()
    assert trainer.prompt_learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in trainer.clip.parameters())


# ----- KgCoOp ----------------------------------------------------------------------------------
def test_knowledge_term_is_the_sources_and_half_the_mean_squared_distance():
    from fewclip_trainers.kgcoop import compute_knowledge_term

    generator = torch.Generator().manual_seed(3)
    learned = F.normalize(torch.randn(4, 6, generator=generator), dim=-1)
    hand = F.normalize(torch.randn(4, 6, generator=generator), dim=-1)
    cosines = [float(learned[c] @ hand[c]) for c in range(4)]  # kgcoop.py:238-241 by hand
    expected = 1.0 - sum(cosines) / 4
    term = compute_knowledge_term(learned, hand)
    assert float(term) == pytest.approx(expected, abs=1e-6)
    squared = ((learned - hand) ** 2).sum(dim=1).mean()  # the paper's mean ||w - w_clip||^2
    assert float(term) == pytest.approx(float(squared) / 2, abs=1e-6)
    assert float(compute_knowledge_term(hand, hand)) == pytest.approx(0.0, abs=1e-6)


def test_kgcoop_loss_is_ce_plus_eight_times_the_term(fast_opts):
    from fewclip_trainers.kgcoop import compute_knowledge_term

    cfg, _, _, trainer, train, _, _ = build_everything("KgCoOp", fast_opts)
    assert cfg.TRAINER.KGCOOP.WEIGHT == 8.0 and trainer.prompt_learner.ctx.shape == (4, 64)
    trainer.prepare(train)
    images = trainer.input_tensor(train.images[:4])
    labels = torch.as_tensor(train.labels[:4])
    losses = trainer.compute_losses(images, labels, np.arange(4))
    text = trainer.compute_class_text()
    expected = 8.0 * compute_knowledge_term(text, trainer.hand_crafted)
    torch.testing.assert_close(losses["knowledge"], expected)
    assert float(losses["knowledge"].detach()) > 0


# ----- CoCoOp ----------------------------------------------------------------------------------
def test_cocoop_meta_net_shapes_and_batched_prompts_equal_the_sources_loop(fast_opts):
    from fewclip.prompt_learning import encode_prompt_embeddings

    cfg, _, _, trainer, train, _, _ = build_everything("CoCoOp", fast_opts)
    meta = trainer.network["meta_net"]
    assert meta.linear1.weight.shape == (64 // 16, 64) and meta.linear2.weight.shape == (64, 4)
    learner = trainer.prompt_learner
    assert learner.ctx.shape == (4, 64)  # "a photo of a"
    features = trainer.encode_images(trainer.input_tensor(train.images[:3]))
    with torch.no_grad():
        meta.linear2.bias.normal_()  # a visible bias, so a wrong shift would show
        bias = meta(features)
        assert bias.shape == (3, 64)
        batched = trainer.compute_logits_from_features(features)
        assert batched.shape == (3, len(trainer.class_names))
        for i in range(3):  # cocoop.py:155-189, one image at a time
            prompts = learner(context=learner.ctx + bias[i])
            text = encode_prompt_embeddings(trainer.clip, prompts, learner.tokens)
            text = text / text.norm(dim=-1, keepdim=True)
            logits = trainer.clip.logit_scale.exp() * features[i] @ text.t()
            torch.testing.assert_close(batched[i], logits, atol=1e-4, rtol=1e-5)
        trainer.node.defrost()
        trainer.node.PROMPT_CHUNK = 4  # one image per text-tower call: the same logits
        torch.testing.assert_close(trainer.compute_logits_from_features(features), batched)


# ----- LP++ ------------------------------------------------------------------------------------
def lpp_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """12 unit-norm features of 3 classes (4 shots each) and 3 unit-norm class text features."""
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(12, 6, generator=generator), dim=-1)
    labels = torch.arange(3).repeat_interleave(4)
    text = F.normalize(torch.randn(3, 6, generator=generator), dim=-1)
    return features, labels, text


def test_lpp_logits_are_the_probe_plus_alpha_times_the_text_similarity():
    from fewclip_trainers.lpp import LPPlusPlusHead, compute_lpp_logits

    features, _, text = lpp_tensors()
    generator = torch.Generator().manual_seed(1)
    weight, bias, alpha = (
        torch.randn(*shape, generator=generator) for shape in ((3, 6), (3,), (3,))
    )
    expected = torch.zeros(12, 3)
    for n in range(12):  # element by element: f_n . w_c + b_c + alpha_c (f_n . t_c)
        for c in range(3):
            visual = sum(float(features[n, d] * weight[c, d]) for d in range(6))
            textual = sum(float(features[n, d] * text[c, d]) for d in range(6))
            expected[n, c] = visual + float(bias[c]) + float(alpha[c]) * textual
    torch.testing.assert_close(compute_lpp_logits(features, weight, bias, alpha, text), expected)
    linear = torch.nn.Linear(6, 3)  # linear_probe_p2.py:127-129 as released
    linear.weight.data, linear.bias.data = weight.clone(), bias.clone()
    released = linear(features) + torch.ones(12, 1) @ alpha[None] * (features @ text.t())
    head = LPPlusPlusHead(3, 6)
    with torch.no_grad():
        head.weight.copy_(weight), head.bias.copy_(bias), head.alpha.copy_(alpha)
    torch.testing.assert_close(head(features, text), released.detach())


def released_lpp_start(features, labels, shots, clip_weights):
    """methods/utils.py:82-124 and methods/linear_probe_p2.py:16-39 as released (fp32 here):
    W = class sums, alpha_0, lr_w, lr_alpha."""
    num_classes = labels.unique().size(0)
    one_hot = torch.zeros(1, len(labels), num_classes)
    one_hot.scatter_(-1, labels[None, :, None], 1)
    centroids = one_hot.transpose(1, 2).bmm(features[None])[0]  # the mean is commented out
    similarity = (features @ clip_weights)[None]
    alpha_tilde = (one_hot * similarity / one_hot.sum(-2, keepdim=True)).sum(1)[0]
    alpha_tilde = alpha_tilde.double() * shots
    init_alpha = torch.mean(250 / shots * alpha_tilde)
    eigenvalues, _ = np.linalg.eigh((features.T @ features).numpy())
    lr_w = 4 * features.shape[0] / max(eigenvalues)
    lr_alpha = features.shape[0] / (max(torch.sum(torch.pow(features @ clip_weights, 2), 0)) * 4)
    return centroids, float(init_alpha), float(lr_w), float(lr_alpha)


def test_lpp_initialisation_and_step_sizes_are_the_released_codes():
    from fewclip_trainers.lpp import (
        compute_alpha_step,
        compute_class_sums,
        compute_init_alpha,
        compute_weight_step,
    )

    features, labels, text = lpp_tensors()
    centroids, init_alpha, lr_w, lr_alpha = released_lpp_start(features, labels, 4, text.t())
    sums = compute_class_sums(features, labels, 3)
    torch.testing.assert_close(sums, centroids)
    torch.testing.assert_close(sums[1], features[4:8].sum(dim=0))  # sums, not means
    assert compute_init_alpha(features, labels, text, 3) == pytest.approx(init_alpha, rel=1e-6)
    by_hand = 250 * np.mean([float((features[labels == c] @ text[c]).mean()) for c in range(3)])
    assert init_alpha == pytest.approx(by_hand, rel=1e-5)
    assert compute_weight_step(features) == pytest.approx(lr_w, rel=1e-5)
    assert compute_alpha_step(features, text) == pytest.approx(lr_alpha, rel=1e-5)
    # a class without shots: no row of sums, left out of alpha's mean
    assert compute_class_sums(features[:8], labels[:8], 3)[2].abs().sum() == 0
    partial = 250 * np.mean([float((features[labels == c] @ text[c]).mean()) for c in range(2)])
    assert compute_init_alpha(features[:8], labels[:8], text, 3) == pytest.approx(partial)


def test_lpp_epochs_are_the_released_loop_with_alpha_on_its_summed_gradient():
    """25 epochs of run_block_descent against linear_probe_p2.py:116-139 written out: alpha is a
    Variable outside the optimiser, so its gradient sums every epoch since the start."""
    from fewclip_trainers.lpp import (
        LPPlusPlusHead,
        compute_alpha_step,
        compute_class_sums,
        compute_init_alpha,
        compute_weight_step,
        run_block_descent,
    )

    features, labels, text = lpp_tensors()
    bias = torch.linspace(-0.3, 0.3, 3)
    steps = (compute_weight_step(features), compute_alpha_step(features, text))
    init_alpha = compute_init_alpha(features, labels, text, 3)
    classifier = torch.nn.Linear(6, 3)
    classifier.weight.data = compute_class_sums(features, labels, 3)
    classifier.bias.data = bias.clone()
    alpha_vec = torch.full((1, 3), init_alpha, requires_grad=True)
    optimizer = torch.optim.SGD(classifier.parameters(), steps[0], momentum=0.9)
    alphas = []
    for epoch in range(25):
        logits = classifier(features) + torch.ones(12, 1) @ alpha_vec * (features @ text.t())
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (epoch + 1) % 10 == 0:
            alpha_vec.data -= steps[1] * alpha_vec.grad.data
        alphas.append(alpha_vec.detach()[0].clone())

    head = LPPlusPlusHead(3, 6)
    with torch.no_grad():
        head.weight.copy_(compute_class_sums(features, labels, 3))
        head.bias.copy_(bias)
        head.alpha.fill_(init_alpha)
    seen = []
    run_block_descent(head, features, labels, text, steps, 25, 10, 0.9, lambda e, _: seen.append(e))
    assert seen == list(range(25))
    torch.testing.assert_close(head.weight.detach(), classifier.weight.detach())
    torch.testing.assert_close(head.bias.detach(), classifier.bias.detach())
    torch.testing.assert_close(head.alpha.detach(), alpha_vec.detach()[0])
    assert torch.equal(alphas[0], alphas[8]) and not torch.equal(alphas[8], alphas[9])
    assert not torch.equal(alphas[9], alphas[19])  # the second step, on 20 epochs' gradients


def test_lpp_starts_from_the_cached_shots_and_picks_the_later_best_validation_epoch(
    fast_opts, monkeypatch
):
    import fewclip_trainers.lpp as lpp

    opts = [*fast_opts, "OPTIM.MAX_ITERS", "0", "TRAINER.LPPLUSPLUS.AUGMENT_VIEWS", "0"]
    opts += ["TRAINER.LPPLUSPLUS.EPOCHS", "30"]
    cfg, _, _, trainer, train, val, _ = build_everything("LPPlusPlus", opts)
    assert (cfg.EVAL.SELECT, cfg.EVAL.VAL_EVERY, cfg.TRAINER.LPPLUSPLUS.ALPHA_EVERY) == (
        "best_val", 1, 10,
    )  # fmt: skip
    started, original = {}, lpp.run_block_descent

    def spy(head, features, labels, text, steps, epochs, *rest):
        started.update(weight=head.weight.detach().clone(), alpha=head.alpha.detach().clone())
        started.update(features=features, steps=steps, epochs=epochs)
        return original(head, features, labels, text, steps, epochs, *rest)

    monkeypatch.setattr(lpp, "run_block_descent", spy)
    report = trainer.fit(train, val)
    cached = trainer.image_features(train)
    labels = torch.as_tensor(train.labels)
    text = trainer.frozen_text_features()
    torch.testing.assert_close(started["features"], cached)
    torch.testing.assert_close(started["weight"], lpp.compute_class_sums(cached, labels, 4))
    assert torch.allclose(started["alpha"], torch.tensor(report["init_alpha"]))
    assert report["init_alpha"] == pytest.approx(lpp.compute_init_alpha(cached, labels, text, 4))
    assert started["steps"] == (report["weight_step"], report["alpha_step"])
    assert started["epochs"] == report["iterations"] == 30
    history = report["val_history"]
    assert [entry["step"] for entry in history] == list(range(1, 31))
    best = max(entry["val_score"] for entry in history)
    later = max(entry["step"] for entry in history if entry["val_score"] == best)
    assert report["selected_step"] == later


# ----- CLAP ------------------------------------------------------------------------------------
def test_clap_penalty_value_and_its_gradient_in_the_prototypes():
    from fewclip_trainers.clap import compute_zero_shot_penalty

    generator = torch.Generator().manual_seed(2)
    prototypes = torch.randn(4, 5, generator=generator)
    anchors = 3.0 * torch.randn(4, 5, generator=generator)  # raw text embeddings: not unit norm
    multipliers = torch.tensor([0.9, 0.1, 0.5, 0.0])
    expected = (
        sum(
            float(multipliers[c])
            * sum(float(prototypes[c, d] - anchors[c, d]) ** 2 for d in range(5))
            for c in range(4)
        )
        / 4
    )  # (1/C) sum_c lambda_c ||w_c - t_c||^2, adapters.py:223, :230
    weights = prototypes.clone().requires_grad_(True)
    penalty = compute_zero_shot_penalty(weights, anchors, multipliers)
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-6)
    penalty.backward()
    gradient = 2.0 * multipliers[:, None] * (prototypes - anchors) / 4  # d/dw_c, written out
    torch.testing.assert_close(weights.grad, gradient)
    assert weights.grad[3].abs().sum() == 0  # lambda 0: no pull on that class
    at_anchor = anchors.clone().requires_grad_(True)
    compute_zero_shot_penalty(at_anchor, anchors, multipliers).backward()
    assert at_anchor.grad.abs().sum() == 0


def test_clap_multipliers_are_the_zero_shot_mean_true_class_probability():
    from fewclip_trainers.clap import compute_initial_multipliers

    generator = torch.Generator().manual_seed(4)
    logits = 3.0 * torch.randn(10, 3, generator=generator)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    one_hot = F.one_hot(labels).float()  # adapters.py:239-243 as released
    released = torch.diag(torch.softmax(logits, -1).t() @ one_hot) / one_hot.sum(0)
    by_hand = [
        np.mean([float(torch.softmax(logits[i], -1)[c]) for i in range(10) if labels[i] == c])
        for c in range(3)
    ]
    got = compute_initial_multipliers(logits, labels, 3)
    torch.testing.assert_close(got, released)
    torch.testing.assert_close(got, torch.tensor(by_hand, dtype=torch.float32))
    absent = compute_initial_multipliers(logits[:7], labels[:7], 3)  # no sample of class 2
    assert float(absent[2]) == 0.0 and torch.allclose(absent[:2], got[:2])


def test_clap_logits_are_the_scaled_cosine_whatever_the_prototype_norm():
    from fewclip_trainers.clap import compute_prototype_logits

    generator = torch.Generator().manual_seed(5)
    features = torch.randn(4, 6, generator=generator)
    prototypes = 7.0 * torch.randn(3, 6, generator=generator)
    expected = torch.zeros(4, 3)
    for n in range(4):  # adapters.py:348-352: 100 x cos(f_n, w_c)
        for c in range(3):
            cosine = float(features[n] @ prototypes[c]) / float(
                features[n].norm() * prototypes[c].norm()
            )
            expected[n, c] = 100.0 * cosine
    torch.testing.assert_close(compute_prototype_logits(features, prototypes, 100.0), expected)
    torch.testing.assert_close(
        compute_prototype_logits(features, F.normalize(prototypes, dim=-1), 100.0), expected
    )


def released_dassl_lrs(lr: float, max_epoch: int, warmup_lr: float, epochs: int) -> list[float]:
    """Dassl's ConstantWarmupScheduler(CosineAnnealingLR(T_max = max_epoch), 1 epoch), stepped
    once per epoch (dassl/optim/lr_scheduler.py:27-54, :128-141), on torch's own cosine."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(max_epoch))
    warmup_epoch, last_epoch, lrs = 1, 0, []
    for _ in range(epochs):
        lrs.append(warmup_lr if last_epoch < warmup_epoch else cosine.get_last_lr()[0])
        if last_epoch >= warmup_epoch:
            optimizer.step()  # no gradient: leaves the parameter, keeps torch's order check quiet
            cosine.step()
        else:
            last_epoch += 1
    return lrs


def test_clap_epoch_lr_is_dassls_constant_warmup_then_cosine():
    from fewclip.epoch_schedule import compute_dassl_epoch_lr

    got = [compute_dassl_epoch_lr(e, 0.1, 300, 1, 1e-5, 0.0) for e in range(300)]
    np.testing.assert_allclose(got, released_dassl_lrs(0.1, 300, 1e-5, 300), rtol=1e-9)
    assert got[0] == 1e-5 and got[1] == 0.1 and got[-1] > 0  # stops short of the minimum


def test_clap_starts_at_the_raw_text_embeddings_with_zero_shot_multipliers(fast_opts):
    from fewclip_trainers.clap import compute_initial_multipliers, compute_prototype_logits

    recipe = build_config(RECIPES / "clap.yaml", SYNTHETIC, [])
    node, optim = recipe.TRAINER.CLAP, recipe.OPTIM
    assert (node.CONSTRAINT, node.AUGMENT_VIEWS, node.EPOCHS[-1], node.MOMENTUM) == (
        "l2",
        20,
        300,
        0.9,
    )
    assert (optim.LR, optim.WEIGHT_DECAY, optim.BATCH_SIZE, optim.WARMUP_CONSTANT_LR) == (
        0.1, 0.0, 256, 1e-5,
    )  # fmt: skip
    opts = [*fast_opts, "OPTIM.MAX_ITERS", "0", "OPTIM.BATCH_SIZE", "256"]
    *_, trainer, train, val, _ = build_everything(
        "CLAP", [*opts, "TRAINER.CLAP.AUGMENT_VIEWS", "0"]
    )
    report = trainer.fit(train, val)
    assert report["iterations"] == report["epochs"] == 300  # 8 shots < 256: one batch an epoch
    texts = trainer.prompt_texts("label")
    with torch.no_grad():  # the mean of the raw embeddings of each class's texts (:118-127)
        raw = [trainer.clip.encode_text(trainer.bundle.tokenizer(t)).mean(dim=0) for t in texts]
    anchors = trainer.clap.anchors
    torch.testing.assert_close(anchors, torch.stack(raw), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(anchors.norm(dim=-1), torch.ones(4))
    features, labels = trainer.image_features(train), torch.as_tensor(train.labels)
    scale = trainer.clip.logit_scale.exp()
    zero_shot = compute_prototype_logits(features, anchors, scale).detach()
    expected = compute_initial_multipliers(zero_shot, labels, 4)
    torch.testing.assert_close(trainer.clap.multipliers, expected)
    assert not torch.equal(trainer.clap.prototypes.detach(), anchors)  # and it trained
    assert report["num_training_features"] == len(train) and report["selected_step"] == 300


def test_clap_trains_on_twenty_views_of_each_shot(fast_opts):
    *_, trainer, train, val, _ = build_everything("CLAP", fast_opts)
    assert trainer.node.AUGMENT_VIEWS == 20
    features, labels = trainer.training_feature_pool(train, 2)
    assert features.shape == (2 * len(train), 64)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2 * len(train)))
    assert labels.tolist() == list(train.labels) * 2
    assert trainer.fit(train, val)["num_training_features"] == 20 * len(train)


@pytest.mark.parametrize(
    ("trainer_name", "key", "value", "message"),
    [
        ("LPPlusPlus", "SELECT_METRIC", "f1", "SELECT_METRIC 'f1' is not one of accuracy, "),
        ("LPPlusPlus", "ALPHA_EVERY", "0", "ALPHA_EVERY must be at least 1, not 0"),
        ("LPPlusPlus", "MOMENTUM", "1.5", "MOMENTUM must be in [0, 1), not 1.5"),
        ("CLAP", "CONSTRAINT", "l1", "CONSTRAINT 'l1' is not one of l2, none"),
        ("CLAP", "AUGMENT_VIEWS", "-1", "AUGMENT_VIEWS must be 0 or more, not -1"),
    ],
)
def test_bad_lpp_and_clap_options_fail_in_one_line_naming_the_key(
    trainer_name, key, value, message, fast_opts
):
    full_key = f"TRAINER.{trainer_name.upper()}.{key}"
    with pytest.raises(ValueError) as error:
        build_everything(trainer_name, [*fast_opts, full_key, value])
    assert str(error.value).startswith(f"{full_key} ") and message in str(error.value)
    assert "\n" not in str(error.value)


# ----- every new recipe end to end through the command line ------------------------------------
NEW_RECIPES = {
    "tip_adapter.yaml": "TipAdapter",
    "tip_adapter_f.yaml": "TipAdapterF",
    "clip_adapter.yaml": "CLIPAdapter",
    "coop.yaml": "CoOp",
    "kgcoop.yaml": "KgCoOp",
    "cocoop.yaml": "CoCoOp",
    "lpp.yaml": "LPPlusPlus",
    "clap.yaml": "CLAP",
}


def test_every_baseline_recipe_runs_through_the_cli(tmp_path, shared_cache):
    out = tmp_path / "out"
    command = [
        sys.executable, "run_shell.py",
        "--recipe", *[str(RECIPES / name) for name in NEW_RECIPES],
        "--dataset-config", str(SYNTHETIC), "--shots", "2", "--seeds", "1",
        *small_opts(tmp_path, shared_cache)[2:], "OUTPUT_DIR", str(out),
        "OPTIM.MAX_ITERS", "2", "OPTIM.BATCH_SIZE", "8",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    by_trainer = {}
    for path in out.rglob("results.json"):
        results = json.loads(path.read_text())
        by_trainer[results["config"]["TRAINER"]["NAME"]] = results
    assert set(by_trainer) == set(NEW_RECIPES.values())
    for name, results in by_trainer.items():
        assert results["status"] == "complete", (name, results.get("error"))
        assert np.isfinite(results["metrics"]["test"]["accuracy"])
