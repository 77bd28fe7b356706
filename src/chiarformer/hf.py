"""Hugging Face transformers adapter (optional extra `hf`): thin wrappers over chiarformer's models.

    import chiarformer                          # registers model_type "chiarformer" with the Auto classes
    model = AutoModelForCausalLM.from_pretrained("exported/")   # or trust_remote_code=True, without the import
    model.generate(ids, max_new_tokens=20)      # transformers' generate, with our KV cache

The wrappers hold a ChiarForCausalLM / ChiarForSequenceClassification as `.chiar` (no second
model implementation); the config stores every ChiarConfig field. save_pretrained copies this
file into the folder (register_for_auto_class), so it uses absolute imports only: transformers
loads it from there as a module of its own, which imports the installed chiarformer.
Tested with transformers 5.x, whose cache keyword is `cache` (`past_key_values` in 4.x; both
are accepted).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput

from chiarformer.config import ChiarConfig
from chiarformer.layers import DCTMixer
from chiarformer.model import ChiarForCausalLM, ChiarForSequenceClassification, KVCache, init_module
from chiarformer.routing import Router

CHIAR_FIELDS = [f.name for f in dataclasses.fields(ChiarConfig)]
# The output field that holds the cache: `cache` in transformers 5.x, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class ChiarHFConfig(PretrainedConfig):
    """Every ChiarConfig field as an attribute, plus transformers' usual names for the sizes."""

    model_type = "chiarformer"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "max_position_embeddings": "max_seq_len"}

    def __init__(self, **kwargs):
        defaults = ChiarConfig()
        for name in CHIAR_FIELDS:
            setattr(self, name, kwargs.pop(name, getattr(defaults, name)))
        kwargs.setdefault("num_labels", self.n_classes)
        kwargs.setdefault("tie_word_embeddings", False)  # the head *is* the embedding matrix: nothing to tie
        super().__init__(**kwargs)

    @property
    def chiar_config(self) -> ChiarConfig:
        return ChiarConfig.from_dict({name: getattr(self, name) for name in CHIAR_FIELDS})

    @classmethod
    def from_chiar(cls, cfg: ChiarConfig, **kwargs) -> ChiarHFConfig:
        return cls(**cfg.to_dict(), **kwargs)


class ChiarCache(Cache):
    """chiarformer's KVCache (K/V of every token, DCT-routed ones too; the padding mask; the
    MetaRouter's running sum) as a transformers Cache, so generate() carries it between steps."""

    def __init__(self, n_layers: int):
        super().__init__(layers=[])
        self.state = KVCache.empty(n_layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.length

    def _rows(self, pick) -> None:
        """Apply pick (a function of a tensor with the batch first) to every cached tensor."""
        s = self.state
        s.keys = [None if k is None else pick(k) for k in s.keys]
        s.values = [None if v is None else pick(v) for v in s.values]
        s.key_mask = None if s.key_mask is None else pick(s.key_mask)
        s.meta_sum = None if s.meta_sum is None else pick(s.meta_sum)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("chiarformer's cache cannot be cropped (assisted decoding is not supported)")


class ChiarHFPreTrained(PreTrainedModel):
    config_class = ChiarHFConfig
    base_model_prefix = "chiar"
    _no_split_modules = ["ChiarLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """Only for weights a checkpoint lacks (and modules built on the meta device): our own init
        (chiarformer.model.init_module), plus what a module's constructor sets (norms, DCT filter)."""
        init_module(module, self.config.init_std)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, DCTMixer):
            nn.init.ones_(module.filter)
        elif isinstance(module, Router):
            module.order_ids.copy_(torch.tensor(module.order))  # non-persistent: never in a checkpoint

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not hand us a DynamicCache: forward makes a ChiarCache

    def get_input_embeddings(self) -> nn.Module:
        return self.chiar.model.embed


class ChiarHFForCausalLM(ChiarHFPreTrained, GenerationMixin):
    def __init__(self, config: ChiarHFConfig):
        super().__init__(config)
        self.chiar = ChiarForCausalLM(config.chiar_config)
        self.post_init()

    def get_output_embeddings(self) -> None:
        return None  # logits use the embedding matrix directly; there is no separate head to tie

    def forward(self, input_ids, attention_mask=None, labels=None, cache=None, past_key_values=None,
                use_cache: bool = False, **kwargs):
        """Logits and loss as ChiarForCausalLM's. attention_mask covers the cached tokens too (as
        transformers passes it). Other keywords (position_ids, return_dict, ...) are accepted and
        not needed: RoPE positions follow the cache, and outputs are always a ModelOutput."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = ChiarCache(self.config.n_layers)
        state = None
        if cache is not None:
            self.chiar.check_decodable()
            state = cache.state
        if attention_mask is not None and state is not None:
            attention_mask = attention_mask[:, -input_ids.shape[1] :]
        out = self.chiar(input_ids, labels=labels, attention_mask=attention_mask, cache=state)
        return CausalLMOutputWithPast(loss=training_loss(out), logits=out.logits, **{CACHE_FIELD: cache})


class ChiarHFForSequenceClassification(ChiarHFPreTrained):
    def __init__(self, config: ChiarHFConfig):
        super().__init__(config)
        self.chiar = ChiarForSequenceClassification(config.chiar_config.replace(n_classes=config.num_labels))
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        out = self.chiar(input_ids, attention_mask=attention_mask, labels=labels)
        return SequenceClassifierOutput(loss=training_loss(out), logits=out.logits)


def training_loss(out) -> torch.Tensor | None:
    """Cross-entropy plus the collapse regulariser (zero unless collapse_reg is set): what
    transformers' Trainer should minimise, as chiarformer's training loop does."""
    return None if out.loss is None else out.loss + out.aux_loss


def wrap(model: ChiarForCausalLM | ChiarForSequenceClassification) -> ChiarHFPreTrained:
    """The transformers model holding a copy of `model`'s weights."""
    cls = ChiarHFForCausalLM if isinstance(model, ChiarForCausalLM) else ChiarHFForSequenceClassification
    hf_model = cls(ChiarHFConfig.from_chiar(model.cfg))
    hf_model.chiar.load_state_dict(model.state_dict())
    return hf_model.eval()


AutoConfig.register(ChiarHFConfig.model_type, ChiarHFConfig, exist_ok=True)
AutoModelForCausalLM.register(ChiarHFConfig, ChiarHFForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(ChiarHFConfig, ChiarHFForSequenceClassification, exist_ok=True)
ChiarHFConfig.register_for_auto_class()
ChiarHFForCausalLM.register_for_auto_class("AutoModelForCausalLM")
ChiarHFForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
