"""Prompt learning (CoOp, CoCoOp, KgCoOp) on the text tower of every family: open_clip's own
(tiny-vit), open_clip's Hugging Face BERT tower (the BiomedCLIP twin) and a Hugging Face CLIP
text model (the PLIP twin): the tower's own word embeddings reproduce `encode_text` with padding
present, the assembled prompts are the written ones, the gradient reaches the context, names are
counted in the family's tokens, and a prompt cut to the context length or a tower that cannot
run is a one-line error."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from yacs.config import CfgNode

from fewclip.backbones import build_clip
from fewclip.prompt_learning import (
    PromptLearner,
    count_name_tokens,
    embed_tokens,
    encode_prompt_embeddings,
)
from fewclip.text_body import text_body

NAMES = ["normal", "lsil"]  # BERT twin: 1 and 4 word pieces; CLIP twin: 6 and 4 letters


@pytest.fixture(params=["tiny-vit", "timm_hf_twin", "hf_clip_twin"])
def bundle(request):
    name = request.param
    if name.endswith("_twin"):
        name = f"local-dir:{request.getfixturevalue(name)}"
    bundle = build_clip(CfgNode({"NAME": name, "PRETRAINED": "", "HF_HUB": ""}))
    bundle.model.eval()
    return bundle


def test_own_word_embeddings_reproduce_encode_text_with_padding(bundle):
    model, tokenizer = bundle.model, bundle.tokenizer
    tokens = tokenizer(["abnormal cells", "normal"])
    assert bool((text_body(model).end_positions(tokens) < tokens.shape[1] - 1).all())  # padding
    with torch.no_grad():
        got = encode_prompt_embeddings(model, embed_tokens(model, tokens), tokens)
        torch.testing.assert_close(got, model.encode_text(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "position, template",
    [("end", "a x a x {}."), ("middle", "a x {} a x."), ("front", "{} a x a x.")],
)
def test_assembled_prompts_are_the_written_ones_on_every_family(bundle, position, template):
    model, tokenizer = bundle.model, bundle.tokenizer
    learner = PromptLearner(model, tokenizer, NAMES, 4, "", False, position)
    with torch.no_grad():  # one-letter words are one token in every family's tokenizer
        learner.ctx.copy_(embed_tokens(model, tokenizer(["a x a x"]))[0, 1:5])
        written = tokenizer([template.format(name) for name in NAMES])
        torch.testing.assert_close(learner(), embed_tokens(model, written))
        got = encode_prompt_embeddings(model, learner(), learner.tokens)
        torch.testing.assert_close(got, model.encode_text(written), atol=1e-5, rtol=0)


def test_word_initialisation_reproduces_the_written_prompt(bundle):
    model, tokenizer = bundle.model, bundle.tokenizer
    learner = PromptLearner(model, tokenizer, NAMES, 16, "a photo", False, "end")
    # one context vector per token of the words: 2 BPE or BERT tokens, 6 letters in the twin
    assert learner.ctx.shape[0] == count_name_tokens(model, tokenizer, ["a photo"])[0]
    with torch.no_grad():
        got = encode_prompt_embeddings(model, learner(), learner.tokens)
        expected = model.encode_text(tokenizer([f"a photo {name}." for name in NAMES]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_gradient_reaches_the_context_and_no_tower_parameter(bundle):
    model = bundle.model
    learner = PromptLearner(model, bundle.tokenizer, NAMES, 4, "", True, "middle")
    encode_prompt_embeddings(model, learner(), learner.tokens).pow(2).sum().backward()
    assert learner.ctx.grad is not None and bool((learner.ctx.grad.abs().sum(-1) > 0).all())
    assert all(parameter.grad is None for parameter in model.parameters())


def test_a_prompt_cut_to_the_context_length_is_a_one_line_error(bundle):
    model, tokenizer = bundle.model, bundle.tokenizer
    length = tokenizer(["normal"]).shape[1]
    fits = length - 3 - count_name_tokens(model, tokenizer, ["normal"])[0]  # start . end
    learner = PromptLearner(model, tokenizer, ["normal"], fits, "", False, "end")
    assert learner().shape[1] == length
    with pytest.raises(ValueError, match=rf"{fits + 1} context vectors and the class words"):
        PromptLearner(model, tokenizer, ["normal"], fits + 1, "", False, "end")


def test_name_tokens_are_counted_in_the_bert_word_pieces(timm_hf_twin):
    bundle = build_clip(
        CfgNode({"NAME": f"local-dir:{timm_hf_twin}", "PRETRAINED": "", "HF_HUB": ""})
    )
    names = ["normal", "squamous cell", "lsil", "cervical intraepithelial lesion"]
    tokens = bundle.tokenizer(names)
    # by hand (fewclip.twins vocabulary): [CLS] 2, l 39, ##s 72, ##i 62, ##l 65, [SEP] 3, [PAD] 0
    assert tokens[2, :7].tolist() == [2, 39, 72, 62, 65, 3, 0]
    assert count_name_tokens(bundle.model, bundle.tokenizer, names) == [1, 2, 4, 3]
    assert tokens.argmax(dim=-1).tolist() != [2, 3, 5, 4]  # the largest id is no [SEP]


def test_name_tokens_are_counted_in_the_clip_letters(hf_clip_twin):
    bundle = build_clip(
        CfgNode({"NAME": f"local-dir:{hf_clip_twin}", "PRETRAINED": "", "HF_HUB": ""})
    )
    assert count_name_tokens(bundle.model, bundle.tokenizer, ["normal", "a b"]) == [6, 2]


def test_a_tower_prompt_learning_cannot_run_is_a_one_line_error():
    from open_clip.hf_model import HFTextEncoder
    from open_clip.transformer import TextTransformer
    from transformers import MT5Config

    model, tokens = nn.Module(), torch.tensor([[1, 2, 0]])
    model.text = TextTransformer(context_length=8, vocab_size=16, width=8, heads=2, layers=1,
                                 embed_cls=True)  # fmt: skip
    with pytest.raises(ValueError, match="the TextTransformer text tower has a class token"):
        embed_tokens(model, tokens)
    config = MT5Config(d_model=8, num_layers=1, num_heads=2, d_kv=4, d_ff=16, vocab_size=16)
    model.text = HFTextEncoder("mt5", output_dim=8, config=config)
    with pytest.raises(ValueError, match=r"unsupported text tower HFTextEncoder \(MT5Model\)"):
        encode_prompt_embeddings(model, torch.zeros(1, 3, 8), tokens)
