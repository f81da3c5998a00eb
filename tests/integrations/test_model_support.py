"""The patch reproduces each supported architecture's output path exactly, or refuses loudly.

A representative subset of scripts/model_support.py (which checks every causal-LM type of the
installed transformers and writes docs/models.md): tiny random models, the patched fp32 model
against the unpatched model in float64 (loss, every parameter gradient, token log-probs,
sequence-mode loss and weights), plus one refused model of each refusal kind and the one guard
shared with IWSFTTrainer.
"""

import copy
import importlib.util
import types
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from iwsft_kernels import IWConfig  # noqa: E402
from iwsft_kernels.integrations import (  # noqa: E402
    UnsupportedModelError,
    apply_iwsft_to_model,
    check_model,
    support_table,
)
from iwsft_kernels.integrations import architectures as arch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ms():
    spec = importlib.util.spec_from_file_location("model_support",
                                                  ROOT / "scripts" / "model_support.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    transformers.logging.set_verbosity_error()
    return mod


EXACT = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma", "gemma2",
         "gemma3_text", "phi3", "granite", "cohere", "olmo2", "gpt2", "gpt_neox", "deepseek_v3",
         "gpt_oss", "falcon_h1", "smollm3"]


@pytest.mark.parametrize("model_type", EXACT)
def test_patched_equals_float64_model(ms, model_type):
    res = ms.check_supported_type(model_type)
    assert res["status"] == "exact", res
    a = arch.SUPPORTED[model_type]
    runs = res["runs"]
    # the variants exercise what a naive patch (CE of hidden @ W^T, no aux) gets wrong, so the
    # comparison above could fail: their naive error is far above the tolerance
    if a.aux:
        assert runs["aux"]["aux"] > 1e-3 and runs["aux"]["naive_err"] > 1e-3, runs["aux"]
    if a.transform is not None:
        varied = [r for k, r in runs.items() if k != "default"]
        assert varied and all(r["naive_err"] > 1e-2 for r in varied), runs
    for r in runs.values():
        assert r["own_loss_err"] < ms.TOL_OWN  # the truth is the model's own loss


def test_tied_embeddings_stay_tied(ms):
    model = ms.build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    apply_iwsft_to_model(model, IWConfig(mode="sft"), backend="torch")
    ids, mask, labels = ms.batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.grad is not None


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("model_type,kind,match", [
    ("bert", arch.HEAD, "layers before the vocabulary projection"),
    ("electra", arch.HEAD, "generator head"),
    ("bart", arch.LABELS, "labels are not shifted"),
])
def test_refused_types(ms, model_type, kind, match):
    assert arch.REFUSED[model_type][0] == kind
    model = ms.build(model_type)
    with pytest.raises(UnsupportedModelError, match=match) as e:
        apply_iwsft_to_model(model, IWConfig(mode="sft"))
    assert model_type in str(e.value) and type(model).__name__ in str(e.value)
    assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)
    assert not hasattr(model, "_iwsft_orig_forward")  # nothing was patched
    # the table of the script confirms what the model's own loss does
    res = ms.check_refused_type(model_type)
    assert res["status"] == "refused" and res["built"], res


def test_refused_label_convention_is_real(ms):
    """BART's causal LM scores logits[t] against labels[t]: the shifted truth is not its loss."""
    model = ms.build("bart")
    ids, mask, labels = ms.batch()
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    unshifted = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                  labels.reshape(-1))
    torch.testing.assert_close(own.double(), unshifted, rtol=1e-5, atol=1e-6)


def test_refused_multimodal_wrapper():
    cfg = transformers.Gemma3Config(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4)
    model = transformers.Gemma3ForConditionalGeneration(cfg)
    with pytest.raises(UnsupportedModelError, match="multimodal"):
        check_model(model)


def test_refused_config_and_class_conditions(ms):
    base = ms.build("llama")
    # a config key that changes the logits, which the type's entry does not read
    m = copy.deepcopy(base)
    m.config.final_logit_softcapping = 5.0
    with pytest.raises(UnsupportedModelError, match="final_logit_softcapping"):
        apply_iwsft_to_model(m)
    # an output projection that is not a plain Linear (a LoRA / quantized lm_head)
    m = copy.deepcopy(base)

    class LoraLike(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    m.lm_head = LoraLike(32, ms.V, bias=False)
    with pytest.raises(UnsupportedModelError, match="own forward, not a plain nn.Linear"):
        apply_iwsft_to_model(m)
    m = copy.deepcopy(base)
    m.lm_head = nn.Sequential(nn.Linear(32, ms.V))
    with pytest.raises(UnsupportedModelError, match="not an nn.Linear"):
        apply_iwsft_to_model(m)
    # a subclass that overrides forward (custom code)
    sub = type("MyLlama", (type(base),), {"forward": lambda self, *a, **k: None})
    m = copy.deepcopy(base)
    m.__class__ = sub
    with pytest.raises(UnsupportedModelError, match="overrides"):
        apply_iwsft_to_model(m)
    # a custom loss function
    m = copy.deepcopy(base)
    m.loss_function = lambda *a, **k: 0
    with pytest.raises(UnsupportedModelError, match="loss_function"):
        apply_iwsft_to_model(m)
    # a model type outside the table
    m = copy.deepcopy(base)
    m.config.model_type = "my_llama"
    with pytest.raises(UnsupportedModelError, match="not in the table"):
        apply_iwsft_to_model(m)
    # a model that is not a transformers class at all
    with pytest.raises(UnsupportedModelError, match="not a transformers model class"):
        apply_iwsft_to_model(types.SimpleNamespace(config=base.config, forward=None))


def test_refused_config_state_bamba_zloss(ms):
    model = ms.build("bamba", {"z_loss_coefficient": 1e-4})
    with pytest.raises(UnsupportedModelError, match="z-loss over every position"):
        apply_iwsft_to_model(model)
    check_model(ms.build("bamba"))  # z_loss_coefficient=0: exact


def test_trainer_uses_the_same_guard(ms):
    """IWSFTTrainer._check_supported: its own VLM / context-parallel checks, then the patch's
    guard for the model (no second list of refusals)."""
    pytest.importorskip("trl")
    from iwsft_kernels.integrations.trl import IWSFTTrainer

    def stub(model):
        return types.SimpleNamespace(model=model, accelerator=types.SimpleNamespace())

    IWSFTTrainer._check_supported(stub(ms.build("gemma2")))  # softcap: supported now
    IWSFTTrainer._check_supported(stub(ms.build("mixtral", ms.AUX_ON)))  # router aux: too
    with pytest.raises(ValueError, match="layers before the vocabulary projection"):
        IWSFTTrainer._check_supported(stub(ms.build("bert")))
    m = ms.build("llama")
    m.config.logit_scale = 3.0
    with pytest.raises(ValueError, match="logit_scale"):
        IWSFTTrainer._check_supported(stub(m))


def test_table_covers_every_causal_lm_type():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    table = support_table()
    assert set(table) == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert not set(arch.SUPPORTED) & set(arch.REFUSED)
    assert set(arch.SUPPORTED) | set(arch.REFUSED) >= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    for t in EXACT:
        assert table[t][0] == "exact"
    doc = (ROOT / "docs" / "models.md").read_text()
    for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        assert f"| `{t}` |" in doc, t


def test_old_names_and_packed_moe_aux(ms):
    """apply_iwsft_to_qwen2 / _llama still work; a packed MoE batch (no attention mask) adds
    the aux loss over all tokens, as the model's forward does in training (use_cache=False:
    with a cache transformers does not treat restarting position_ids as packed sequences)."""
    from iwsft_kernels.integrations import apply_iwsft_to_llama, apply_iwsft_to_qwen2

    apply_iwsft_to_llama(ms.build("llama"))
    apply_iwsft_to_qwen2(ms.build("qwen2"))
    with pytest.raises(TypeError, match="qwen2"):
        apply_iwsft_to_qwen2(ms.build("llama"))
    model = ms.build("qwen3_moe", ms.AUX_ON)
    ref = copy.deepcopy(model)
    apply_iwsft_to_model(model, IWConfig(mode="sft"), backend="torch")
    ids = torch.randint(3, ms.V, (1, 10))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    out = model(input_ids=ids, position_ids=pos, labels=ids)
    with torch.no_grad():
        want = ref(input_ids=ids, position_ids=pos, output_router_logits=True, use_cache=False)
    torch.testing.assert_close(out.aux_loss, want.aux_loss)
    assert out.aux_loss > 0


def test_peft_heads(ms):
    """PEFT: modules_to_save=["lm_head"] (a trainable copy of a plain Linear) is accepted and
    trains the copy; LoRA on lm_head (its own forward) is refused with the hint."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    pm = peft.get_peft_model(ms.build("llama"), cfg)
    base = pm.get_base_model()
    apply_iwsft_to_model(base, IWConfig(mode="sft"), backend="torch")
    ids, mask, labels = ms.batch()
    pm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    copy_w = base.lm_head.modules_to_save["default"].weight
    assert copy_w.grad is not None and base.lm_head.original_module.weight.grad is None
    lora = peft.get_peft_model(ms.build("llama"),
                               peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(UnsupportedModelError, match="modules_to_save"):
        apply_iwsft_to_model(lora.get_base_model())


def test_refused_loss_and_interface_kinds(ms):
    """The other two kinds: a model with its own loss (MusicGen's per-codebook heads) and one
    whose forward is not a causal-LM training forward (a Gemma4 assistant / draft model)."""
    dec = transformers.MusicgenDecoderConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, ffn_dim=32, num_codebooks=2)
    assert arch.REFUSED["musicgen"][0] == arch.LOSS
    with pytest.raises(UnsupportedModelError, match="codebook"):
        check_model(transformers.MusicgenForCausalLM(dec))
    assert arch.REFUSED["gemma4_unified_assistant"][0] == arch.INTERFACE
    with pytest.raises(UnsupportedModelError, match="draft model"):
        check_model(ms.build("gemma4_unified_assistant"))
