"""bem.multimodal: the image task (determinism, disjoint splits), the vision tower (shapes,
gradients), input checks, controller integration, coverage, and the image-keyed KV cache (cached ==
uncached generation; same text + different image never shares K/V; the same image reuses it)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bem.attach import AdapterSpec, BemConfig, attach
from bem.model import BemForCausalLM, TransformerConfig, new_kv_cache
from bem.multimodal.coverage import coverage, example_tokens, region_mass
from bem.multimodal.generation import (IMAGE_PLACEHOLDER, generate, model_digest,
                                       visual_routing_key)
from bem.multimodal.images import (CELLS, COLOURS, GRID, KINDS, generate_images, render)
from bem.multimodal.model import ImageRouter, MultimodalLM
from bem.multimodal.vision import (NUM_VISUAL_TOKENS, Projector, VisionEncoder, VisionTower,
                                   check_images, image_digest)

CFG = TransformerConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                        max_positions=256, positions="learned")


def _lm(seed: int = 0) -> BemForCausalLM:
    torch.manual_seed(seed)
    return BemForCausalLM(CFG).eval()


def _routed(seed: int = 0) -> MultimodalLM:
    lm = attach(_lm(seed), BemConfig([AdapterSpec("lora", ["q_proj", "v_proj"], {"rank": 2})],
                                     num_experts=2))
    lm.bem_controller.set_macro_router(None)
    torch.manual_seed(seed + 1)
    for name, p in lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    router = ImageRouter(2, CFG.d_model)
    model = MultimodalLM(lm, VisionTower(CFG.d_model, 8), router)
    with torch.no_grad():   # k-means on training images: both experts get images
        router.fit(model.image_summary(model.visual_tokens(_images(generate_images(
            "train", 4, seed=0)))), seed=seed)
    return model.eval()


def _images(examples) -> torch.Tensor:
    return torch.from_numpy(np.stack([ex.image() for ex in examples]))


def _prompt(ex) -> list[int]:
    ids, lo, _ = example_tokens(ex)
    return ids[:lo + 1]


# ---- the image task -----------------------------------------------------------------------------

def test_generator_is_deterministic_and_versioned():
    a = generate_images("train", 5, seed=3)
    b = generate_images("train", 5, seed=3)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    assert all(np.array_equal(x.image(), y.image()) for x, y in zip(a, b))
    assert [x.to_dict() for x in generate_images("train", 5, seed=4)] != [x.to_dict() for x in a]
    assert {x.kind for x in a} == set(KINDS)


def test_splits_are_disjoint_by_image_content():
    def contents(split):
        out = set()
        for ex in generate_images(split, 60, seed=0):
            d = json.loads(ex.spec)
            d.pop("noise")
            out.add(json.dumps(d, sort_keys=True))
        return out
    train, val, test = contents("train"), contents("validation"), contents("test")
    assert not (train & val) and not (train & test) and not (val & test)


def test_images_and_answers_are_consistent():
    for ex in generate_images("test", 8, seed=1):
        img = ex.image()
        assert img.shape == (3, 32, 32) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert len(set(ex.evidence_patches) & set(ex.distractor_patches)) == 0
        assert all(0 <= p < GRID * GRID for p in ex.evidence_patches + ex.distractor_patches)
        spec = json.loads(ex.spec)
        if ex.kind == "shapes" and "colour" in ex.prompt:
            cell = next(i for i, c in enumerate(CELLS) if f"Q: {c} colour" in ex.prompt)
            assert spec["colours"][cell] == ex.answer
            # the evidence cell is drawn in the answer's colour
            rows, cols = np.divmod(np.array(ex.evidence_patches), GRID)
            patch = img[:, rows.min() * 4:(rows.max() + 1) * 4, cols.min() * 4:(cols.max() + 1) * 4]
            bright = patch.reshape(3, -1)[:, patch.max(0).reshape(-1) > 0.5].mean(1)
            assert np.abs(bright - np.array(COLOURS[ex.answer])).max() < 0.15
        if ex.kind == "shapes_passage":
            assert ex.needs == "image+text"
            assert ex.passage_lines[ex.evidence_line].endswith(f": {ex.answer}")
        if ex.kind == "bars" and "height" in ex.prompt:
            colour = ex.prompt.split("Q: ")[1].split()[0]
            assert str(spec["heights"][spec["colours"].index(colour)]) == ex.answer


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate_images("dev", 2)
    with pytest.raises(ValueError, match="n_images"):
        generate_images("train", 0)
    with pytest.raises(ValueError, match="kinds"):
        generate_images("train", 2, kinds=("photos",))
    with pytest.raises(TypeError, match="spec"):
        render(3)


# ---- vision tower -------------------------------------------------------------------------------

def test_tower_shapes_and_gradients():
    torch.manual_seed(0)
    tower = VisionTower(CFG.d_model, 8)
    assert isinstance(tower.encoder, VisionEncoder) and isinstance(tower.projector, Projector)
    proj = tower.projector
    assert [type(m).__name__ for m in (proj.fc1, proj.fc2)] == ["Linear", "Linear"]
    imgs = _images(generate_images("train", 1, seed=0)[:3])
    out = tower(imgs)
    assert out.shape == (3, NUM_VISUAL_TOKENS, CFG.d_model) == (3, 64, 32)
    # gradients reach every encoder and projector parameter through the frozen LM
    model = MultimodalLM(_lm(), tower)
    for p in model.lm.parameters():
        p.requires_grad_(False)
    ex = generate_images("train", 1, seed=0)[:3]
    ids = torch.tensor([example_tokens(e)[0][:10] for e in ex])
    model(ids, imgs).float().logsumexp(-1).sum().backward()
    for name, p in tower.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.lm.parameters())


def test_bad_images_raise_naming_the_argument():
    good = torch.rand(2, 3, 32, 32)
    assert check_images(good).shape == (2, 3, 32, 32)
    assert check_images(np.random.rand(3, 32, 32)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"images: expected shape"):
        check_images(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"images: expected shape"):
        check_images(torch.rand(2, 1, 32, 32))
    with pytest.raises(TypeError, match=r"images: expected floating"):
        check_images(torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"images: expected floating"):
        check_images(np.zeros((1, 3, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"images: expected pixel values in \[0, 1\]"):
        check_images(good * 255)
    with pytest.raises(ValueError, match=r"images: expected pixel values in \[0, 1\]"):
        check_images(good - 0.5)
    nan = good.clone()
    nan[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="images: NaN"):
        check_images(nan)
    with pytest.raises(TypeError, match="images: expected a"):
        check_images([[0.0]])
    with pytest.raises(ValueError, match="images: expected 3 images"):
        check_images(good, 3)


def test_image_given_to_text_only_model_is_refused():
    text_only = MultimodalLM(_lm())
    ids = torch.tensor([[257, 65, 66]])
    with pytest.raises(ValueError, match="images: this is a text-only model"):
        text_only(ids, torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="images: this is a text-only model"):
        generate(text_only, [[257, 65]], torch.rand(1, 3, 32, 32), max_new_tokens=2)
    with pytest.raises(TypeError, match="model: expected MultimodalLM"):
        generate(_lm(), [[257, 65]], torch.rand(1, 3, 32, 32), max_new_tokens=2)
    # without an image the text-only wrapper is the plain model
    torch.testing.assert_close(text_only(ids), text_only.lm(ids))
    with pytest.raises(ValueError, match="images: required"):
        _routed()(ids)
    with pytest.raises(ValueError, match="ids: expected a"):
        text_only(ids.to(torch.int32))


def test_wrapper_rejects_mismatched_parts():
    with pytest.raises(ValueError, match="vision: projects to width"):
        MultimodalLM(_lm(), VisionTower(48, 8))
    with pytest.raises(ValueError, match="router: an image router needs a vision tower"):
        MultimodalLM(_lm(), None, ImageRouter(2, 32))
    lm = attach(_lm(), BemConfig([AdapterSpec("lora", ["q_proj"], {"rank": 1})], num_experts=2))
    with pytest.raises(ValueError, match="give an ImageRouter"):
        MultimodalLM(lm, VisionTower(32, 8))


# ---- controller integration ---------------------------------------------------------------------

def test_image_feeds_the_controller_and_routes_the_text_chunks():
    model = _routed()
    ex = generate_images("train", 4, seed=0)
    imgs = _images(ex)
    visual = model.visual_tokens(imgs)
    exp = model.chunk_experts(visual, 3)
    assert exp.shape == (len(ex), 3)
    assert bool((exp[:, 0] == -1).all())                      # the image chunk: no adapter
    assert bool((exp[:, 1] == exp[:, 2]).all())               # text chunks: the image's expert
    torch.testing.assert_close(exp[:, 1], model.router(model.image_summary(visual)))
    assert len(set(exp[:, 1].tolist())) == 2                  # both experts in use here
    emb = model.embeddings(torch.tensor([[257] * 10] * len(ex)), visual)
    pos = torch.arange(emb.shape[1]).expand(len(ex), -1)
    ctrl = model.control(emb, pos, visual)
    # chunk 1's feature is the image's (mean visual token, RMS-normalised)
    torch.testing.assert_close(ctrl.features[:, 1], model.image_summary(visual))
    # the same text with another image: another expert, other logits
    ids = torch.tensor([_prompt(ex[0])] * 2)
    pair = [i for i in range(len(ex)) if exp[i, 1] != exp[0, 1]][:1] + [0]
    out = model(ids, imgs[pair])
    assert not torch.allclose(out[0], out[1])


def test_router_fit_is_seeded_and_uses_every_cluster():
    x = torch.cat([torch.randn(20, 4) + 5, torch.randn(20, 4) - 5])
    a, b = ImageRouter(2, 4), ImageRouter(2, 4)
    assert a.fit(x, seed=1) == b.fit(x, seed=1) and sorted(a.fit(x, seed=1)) == [20, 20]
    torch.testing.assert_close(a.centroids, b.centroids)
    assert set(a(x).tolist()) == {0, 1}


# ---- generation and the KV cache ----------------------------------------------------------------

@pytest.mark.parametrize("routed", [False, True])
def test_cached_equals_uncached_with_image_prefix(routed):
    if routed:
        model = _routed(2)
    else:
        torch.manual_seed(5)
        model = MultimodalLM(_lm(3), VisionTower(CFG.d_model, 8)).eval()
    ex = generate_images("test", 2, seed=0)[:5]
    prompts, imgs = [_prompt(e) for e in ex], _images(ex)
    ref = generate(model, prompts, imgs, max_new_tokens=6)
    cache = new_kv_cache(model.lm, 64)
    assert generate(model, prompts, imgs, max_new_tokens=6, cache=cache) == ref
    again = generate(model, prompts, imgs, max_new_tokens=6, cache=cache)   # now from the cache
    assert again == ref
    assert cache.manager.stats().tokens_hit > 0
    # the logits of a cached step equal the uncached forward's
    with torch.no_grad():
        full = model(torch.tensor([prompts[0] + ref[0][:3]]), imgs[:1])
    assert int(full[0, -1].argmax()) == ref[0][3]


def test_prefix_spanning_several_text_chunks_is_reused_for_the_same_image():
    model = _routed(4)
    ex = [e for e in generate_images("test", 6, seed=0) if e.kind == "shapes_passage"][:2]
    prompts, imgs = [_prompt(e) for e in ex], _images(ex)
    assert len(prompts[0]) > 64                               # a full text block after the image
    cache = new_kv_cache(model.lm, 64)
    ref = generate(model, prompts, imgs, max_new_tokens=4)
    generate(model, prompts[:1], imgs[:1], max_new_tokens=4, cache=cache)
    before = cache.manager.stats().tokens_hit
    assert generate(model, prompts[:1], imgs[:1], max_new_tokens=4, cache=cache) == ref[:1]
    assert cache.manager.stats().tokens_hit - before == 128   # visual block + first text block


def test_same_text_different_image_never_shares_kv_and_same_image_reuses_it():
    torch.manual_seed(7)
    model = MultimodalLM(_lm(7), VisionTower(CFG.d_model, 8)).eval()
    ex = generate_images("test", 1, seed=0)
    img_a, img_b = _images(ex[:1]), torch.from_numpy(render(ex[-1].spec))[None]
    assert image_digest(img_a) != image_digest(img_b)
    text = list(range(65, 65 + 70))                           # a full text block after the image
    cache = new_kv_cache(model.lm, 64)

    def hits(img):
        before = cache.manager.stats().tokens_hit
        out = generate(model, [text], img, max_new_tokens=3, cache=cache)
        return cache.manager.stats().tokens_hit - before, out

    first, out_a = hits(img_a)
    assert first == 0
    other, out_b = hits(img_b)
    assert other == 0                                         # same text, other image: no reuse
    same, out_a2 = hits(img_a.clone())
    assert same == 128 and out_a2 == out_a                    # same pixels: visual + text block
    assert out_a == generate(model, [text], img_a, max_new_tokens=3)
    assert out_b == generate(model, [text], img_b, max_new_tokens=3)
    # one changed pixel is another image
    tweaked = img_a.clone()
    tweaked[0, 0, 0, 0] = 1.0 - tweaked[0, 0, 0, 0]
    assert hits(tweaked)[0] == 0
    # a text-only request with the same ids never hits a visual block
    text_only = MultimodalLM(model.lm)
    before = cache.manager.stats().tokens_hit
    generate(text_only, [[IMAGE_PLACEHOLDER] * 64 + text], None, max_new_tokens=2, cache=cache)
    assert cache.manager.stats().tokens_hit == before


def test_visual_keys_carry_the_image_digest_and_the_weights():
    torch.manual_seed(0)
    model = MultimodalLM(_lm(), VisionTower(CFG.d_model, 8))
    key = model_digest(model)
    a, b = image_digest(torch.zeros(3, 32, 32)), image_digest(torch.ones(3, 32, 32))
    assert a == image_digest(torch.zeros(1, 3, 32, 32, dtype=torch.float64))
    ka, kb = visual_routing_key(key, a), visual_routing_key(key, b)
    assert ka != kb and ka == visual_routing_key(key, a) and ka.expert == -1
    with torch.no_grad():
        model.vision.projector.fc2.bias.add_(1.0)             # another tower: other keys
    assert visual_routing_key(model_digest(model), a) != ka
    with pytest.raises(ValueError, match="image_key"):
        visual_routing_key(key, b"short")


# ---- coverage -----------------------------------------------------------------------------------

def test_coverage_per_example_and_aggregate():
    model = _routed(1)
    ex = generate_images("test", 2, seed=0)
    mass = region_mass(model, ex)
    assert mass.shape == (len(ex), 4) and bool((mass >= 0).all()) and bool((mass <= 1 + 1e-5).all())
    # image mass (evidence + distractors) is at most the whole attention
    assert bool((mass[:, :2].sum(1) <= 1 + 1e-5).all())
    cov = coverage(model, ex, batch_size=4, correct=[1.0] * 2 + [0.0] * (len(ex) - 2))
    assert len(cov["per_example"]) == len(ex)
    for row, e in zip(cov["per_example"], ex):
        assert 0 <= row["image_coverage"] <= 1 and 0 <= row["gradient_coverage"] <= 1
        assert row["image_chance"] == pytest.approx(0.25)
        assert ("text_coverage" in row) == bool(e.passage_lines)
    agg = cov["aggregate"]
    assert agg["n"] == len(ex) and 0 <= agg["image_coverage"] <= 1
    assert set(agg["by_kind"]) == {e.kind for e in ex}
    assert agg["image_coverage_correct"] is not None
    with pytest.raises(ValueError, match="vision tower"):
        region_mass(MultimodalLM(_lm()), ex)


def test_coverage_sees_attention_placed_on_the_evidence():
    """A model whose attention is forced onto the evidence patches scores coverage 1."""
    model = MultimodalLM(_lm(), VisionTower(CFG.d_model, 8)).eval()
    ex = [e for e in generate_images("test", 3, seed=0) if not e.passage_lines][:2]
    import bem.multimodal.coverage as cov_mod

    class Forced(cov_mod._Capture):
        def _hook(self, attn, args, output):
            x, batch = args
            B, T = batch.positions.shape
            p = torch.zeros(B, attn.cfg.n_heads, T, T)
            for b, e in enumerate(ex):
                p[b, :, :, list(e.evidence_patches)] = 1.0 / len(e.evidence_patches)
            self.probs.append(p)

    orig = cov_mod._Capture
    cov_mod._Capture = Forced
    try:
        mass = region_mass(model, ex)
    finally:
        cov_mod._Capture = orig
    torch.testing.assert_close(mass[:, 0], torch.ones(len(ex)))
    torch.testing.assert_close(mass[:, 1], torch.zeros(len(ex)))
