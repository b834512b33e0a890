"""T3ForTRT: T3 rewritten as a plain ``input_ids``-only GPT-2 over one unified vocabulary.

TensorRT-LLM's GPT model takes token ids, looks them up in one ``vocab_embedding`` table, adds
learned absolute positions and projects the last hidden state with one ``lm_head``. T3 instead
feeds its own embeddings: a voice prefix (speaker projection + prompt speech embeddings), text
embeddings (``text_emb``) and speech embeddings (``speech_emb``), and reads ``speech_head``.
T3ForTRT makes the two agree without changing a single weight value:

* unified ids: text id ``t`` → ``t`` (``[0, V_text)``), speech id ``s`` → ``V_text + s``
  (``[V_text, V_text + V_speech)``); for Turbo ``[0, 50276)`` and ``[50276, 56839)``.
  ``embed.weight = cat(text_emb.weight, speech_emb.weight)`` — exact copies.
* ``lm_head.weight``: zeros for text rows, ``speech_head.weight`` for speech rows.
  ``logit_bias``: ``-inf`` for text rows (text is never sampled), ``speech_head.bias`` for speech
  rows. TensorRT-LLM's GPT ``lm_head`` has no bias, so the exported engine gets this vector as the
  per-request ``embedding_bias`` (see :mod:`export.trtllm_checkpoint`).
* the voice prefix ``(P, C)`` is baked: :meth:`T3ForTRT.forward` prepends it to the first chunk;
  in TensorRT-LLM it is the prompt table (ids ``V_total + i`` for ``i < P``).

The trunk is the token service's own GPT-2 (``token_service.t3.model.GPT2``), so the numbers are
computed by the same blocks the PyTorch engine runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from safetensors.torch import load_file, save_file

from token_service.t3.config import START_SPEECH, STOP_SPEECH, T3Config
from token_service.t3.model import GPT2

KVList = list[tuple[Tensor, Tensor]]


_TURBO = T3Config.preset("turbo")  # the defaults below are Turbo's, read from the T3 config
# fields T3ForTRTConfig shares with T3Config under the same name (``prefix_len`` is derived there)
_SHARED_FIELDS = ("name", "n_layer", "n_embd", "n_head", "n_positions", "layer_norm_eps", "text_vocab_size",
                  "speech_vocab_size")


@dataclass(frozen=True)
class T3ForTRTConfig:
    """Shape of a T3ForTRT model; ``total_vocab_size = text_vocab_size + speech_vocab_size``.

    The defaults are ``T3Config.preset("turbo")``'s; build other shapes with :meth:`from_t3_config`.
    """

    n_layer: int = _TURBO.n_layer
    n_embd: int = _TURBO.n_embd
    n_head: int = _TURBO.n_head
    n_positions: int = _TURBO.n_positions
    layer_norm_eps: float = _TURBO.layer_norm_eps
    text_vocab_size: int = _TURBO.text_vocab_size
    speech_vocab_size: int = _TURBO.speech_vocab_size
    prefix_len: int = _TURBO.prefix_len
    start_speech: int = START_SPEECH  # speech-vocabulary ids (not unified)
    stop_speech: int = STOP_SPEECH
    name: str = _TURBO.name

    @property
    def total_vocab_size(self) -> int:
        return self.text_vocab_size + self.speech_vocab_size

    @property
    def speech_offset(self) -> int:
        """Unified id of speech id 0."""
        return self.text_vocab_size

    @property
    def start_speech_id(self) -> int:
        """Unified id of start-of-speech."""
        return self.speech_offset + self.start_speech

    @property
    def stop_speech_id(self) -> int:
        """Unified id of stop-of-speech (the TensorRT-LLM ``end_id``)."""
        return self.speech_offset + self.stop_speech

    def to_t3_config(self) -> T3Config:
        """The T3 shape of the trunk (fields T3ForTRT does not carry keep T3Config's defaults)."""
        return T3Config(**{f: getattr(self, f) for f in _SHARED_FIELDS}, prompt_len=self.prefix_len - 1)

    @classmethod
    def from_t3_config(cls, cfg: T3Config) -> "T3ForTRTConfig":
        return cls(**{f: getattr(cfg, f) for f in _SHARED_FIELDS}, prefix_len=cfg.prefix_len)

    def to_dict(self) -> dict:
        return asdict(self)


class T3ForTRT(nn.Module):
    """GPT-2 over unified ids with a baked voice prefix. See the module docstring."""

    def __init__(self, cfg: T3ForTRTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.total_vocab_size, cfg.n_embd)
        self.tfmr = GPT2(cfg.to_t3_config())
        del self.tfmr.wte  # the unified ``embed`` replaces it
        self.lm_head = nn.Linear(cfg.n_embd, cfg.total_vocab_size, bias=False)
        self.register_buffer("logit_bias", torch.zeros(cfg.total_vocab_size))
        self.register_buffer("voice_prefix", torch.zeros(0, cfg.n_embd))

    # ------------------------------------------------------------------ voice
    def set_voice_prefix(self, prefix: Tensor) -> None:
        """prefix ``(P, C)`` or ``(1, P, C)``: the voice's conditioning embeddings."""
        prefix = prefix.detach()
        if prefix.dim() == 3 and prefix.shape[0] == 1:
            prefix = prefix[0]
        if prefix.dim() != 2 or prefix.shape[1] != self.cfg.n_embd:
            raise ValueError(f"voice prefix must be (P, {self.cfg.n_embd}), got {tuple(prefix.shape)}")
        self.voice_prefix = prefix.to(self.embed.weight)

    @property
    def has_voice_prefix(self) -> bool:
        return self.voice_prefix.shape[0] > 0

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor, past_key_values: KVList | None = None, use_cache: bool = False,
                prepend_voice_prefix: bool = True) -> tuple[Tensor, KVList | None]:
        """input_ids ``(B, T)`` unified ids → logits ``(B, T, V_total)`` float32 (+ cache if ``use_cache``).

        With no ``past_key_values`` and ``prepend_voice_prefix`` the voice prefix ``(P, C)`` is put
        in front of every row (positions ``0..P-1``); the returned logits cover the ``T`` input
        positions only. ``past_key_values``: per layer ``(k, v)`` of shape ``(B, H, L_past, D)``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.total_vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.cfg.total_vocab_size}); got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        B, T = input_ids.shape
        x = self.embed(input_ids)
        n_prefix = 0
        if past_key_values is None and prepend_voice_prefix:
            if not self.has_voice_prefix:
                raise RuntimeError("voice prefix not set: call set_voice_prefix() (or load a converted "
                                   "checkpoint that includes one) before forward(prepend_voice_prefix=True)")
            n_prefix = self.voice_prefix.shape[0]
            x = torch.cat([self.voice_prefix.expand(B, -1, -1).to(x.dtype), x], dim=1)
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        total = x.shape[1]
        if past_len + total > self.cfg.n_positions:
            raise ValueError(f"sequence of {past_len + total} positions exceeds n_positions={self.cfg.n_positions}")
        positions = torch.arange(past_len, past_len + total, device=x.device).expand(B, -1)
        kv = self._grow_cache(past_key_values, B, total, x)
        rows = torch.arange(B, device=x.device)[:, None]
        L = past_len + total
        mask = (torch.arange(L, device=x.device)[None, None, :] <= positions[:, :, None])[:, None]
        h = x + self.tfmr.wpe(positions)
        for block, layer_kv in zip(self.tfmr.h, kv):
            h = block(h, rows, positions, layer_kv, mask)
        h = self.tfmr.ln_f(h[:, n_prefix:])
        logits = (self.lm_head(h) + self.logit_bias.to(h.dtype)).float()
        return logits, (kv if use_cache else None)

    def _grow_cache(self, past: KVList | None, B: int, T: int, like: Tensor) -> KVList:
        H, D = self.cfg.n_head, self.cfg.n_embd // self.cfg.n_head
        fresh = like.new_zeros(B, H, T, D)
        if past is None:
            return [(fresh.clone(), fresh.clone()) for _ in range(self.cfg.n_layer)]
        return [(torch.cat([k, fresh], dim=2), torch.cat([v, fresh], dim=2)) for k, v in past]

    # ------------------------------------------------------------------ generate
    @torch.inference_mode()
    def generate(self, text_ids: Sequence[int] | Tensor, max_new_tokens: int = 1001, temperature: float = 0.8,
                 top_k: int = 1000, top_p: float = 0.95, repetition_penalty: float = 1.2,
                 generator: torch.Generator | None = None) -> list[int]:
        """Sample speech ids (speech vocabulary, stop token excluded) for one text.

        ``max_new_tokens`` caps the sampled tokens, the stop token included (upstream's
        ``max_gen_len=1000`` samples at most 1001, hence the default), like ``SamplingParams``.

        Follows upstream ``T3.inference_turbo``: input ``[prefix | text | start_speech]``; logits
        processors temperature → top-k → top-p → repetition penalty, the penalty seeing the
        start token on the first step and the generated tokens afterwards.
        """
        ids = torch.as_tensor(list(text_ids) if not isinstance(text_ids, Tensor) else text_ids, dtype=torch.long)
        ids = ids.reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.text_vocab_size):
            raise ValueError(f"text ids must lie in [0, {self.cfg.text_vocab_size})")
        dev = self.embed.weight.device
        inp = torch.cat([ids, torch.tensor([self.cfg.start_speech_id])]).to(dev)[None]
        logits, past = self(inp, use_cache=True)
        history = [self.cfg.start_speech]
        out: list[int] = []
        off = self.cfg.speech_offset
        for step in range(max_new_tokens):
            speech_logits = logits[0, -1, off:]
            tok = sample_next(speech_logits, history, temperature, top_k, top_p, repetition_penalty, generator)
            if step == 0:
                history = []
            history.append(tok)
            if tok == self.cfg.stop_speech:
                break
            out.append(tok)
            logits, past = self(torch.tensor([[off + tok]], device=dev), past_key_values=past, use_cache=True)
        return out


def process_logits(logits: Tensor, history: Sequence[int], temperature: float, top_k: int, top_p: float,
                   repetition_penalty: float) -> Tensor:
    """logits ``(V,)`` → processed float32 logits, upstream's order: temperature, top-k, top-p, penalty."""
    x = logits.float().clone()
    if temperature > 0 and temperature != 1.0:
        x = x / temperature
    if top_k > 0:
        kth = torch.topk(x, min(top_k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=False)
        remove = sorted_x.softmax(-1).cumsum(-1) <= (1 - top_p)
        remove[-1] = False  # the most likely token always stays
        x = x.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    if repetition_penalty != 1.0 and len(history):
        idx = torch.tensor(sorted(set(history)), device=x.device)
        score = x[idx]
        x[idx] = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
    return x


def sample_next(logits: Tensor, history: Sequence[int], temperature: float, top_k: int, top_p: float,
                repetition_penalty: float, generator: torch.Generator | None = None) -> int:
    """logits ``(V,)`` → one id drawn from :func:`process_logits`' distribution."""
    probs = torch.softmax(process_logits(logits, history, temperature, top_k, top_p, repetition_penalty), -1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---------------------------------------------------------------------- conversion
def convert_state_dict(t3_sd: dict[str, Tensor], cfg: T3ForTRTConfig) -> dict[str, Tensor]:
    """Upstream-keyed T3 state dict → T3ForTRT state dict (weights copied exactly; no prefix)."""
    need = ["text_emb.weight", "speech_emb.weight", "speech_head.weight", "speech_head.bias", "tfmr.wpe.weight",
            "tfmr.ln_f.weight", "tfmr.ln_f.bias"]
    missing = [k for k in need if k not in t3_sd]
    if missing:
        raise ValueError(f"T3 state dict lacks {missing} (is this a Turbo/Nano T3 checkpoint?)")
    text, speech = t3_sd["text_emb.weight"], t3_sd["speech_emb.weight"]
    if text.shape[0] != cfg.text_vocab_size or speech.shape[0] != cfg.speech_vocab_size:
        raise ValueError(f"vocab sizes {text.shape[0]}/{speech.shape[0]} do not match the config "
                         f"{cfg.text_vocab_size}/{cfg.speech_vocab_size}")
    out = {k: v for k, v in t3_sd.items() if k.startswith("tfmr.") and not k.startswith("tfmr.wte")}
    out["embed.weight"] = torch.cat([text, speech], dim=0)
    head = t3_sd["speech_head.weight"]
    out["lm_head.weight"] = torch.cat([head.new_zeros(cfg.text_vocab_size, cfg.n_embd), head], dim=0)
    bias = t3_sd["speech_head.bias"].float()
    out["logit_bias"] = torch.cat([torch.full((cfg.text_vocab_size,), float("-inf")), bias])
    return out


def create_t3_for_trt(t3_sd: dict[str, Tensor], voice_prefix: Tensor | None = None,
                      t3_cfg: T3Config | None = None) -> T3ForTRT:
    """Build a T3ForTRT from an upstream-keyed T3 state dict (and optionally bake a voice prefix)."""
    t3_cfg = t3_cfg or T3Config.from_state_dict(t3_sd)
    cfg = T3ForTRTConfig.from_t3_config(t3_cfg)
    model = T3ForTRT(cfg)
    sd = convert_state_dict(t3_sd, cfg)
    sd["voice_prefix"] = torch.zeros(0, cfg.n_embd)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    if voice_prefix is not None:
        model.set_voice_prefix(voice_prefix)
    return model.eval()


CONVERTED_WEIGHTS = "t3_for_trt.safetensors"
CONVERTED_CONFIG = "t3_for_trt.json"


def convert_checkpoint(model_dir: str | Path, output_dir: str | Path, voice: str = "default") -> Path:
    """Model folder → ``output_dir/t3_for_trt.{safetensors,json}`` with ``voice``'s prefix baked in."""
    from export.voice_prefix import compute_voice_prefix, load_t3_state_dict

    import json
    t3_sd, t3_cfg = load_t3_state_dict(model_dir)
    prefix = compute_voice_prefix(t3_sd, model_dir, voice, t3_cfg)
    model = create_t3_for_trt(t3_sd, prefix, t3_cfg)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / CONVERTED_WEIGHTS))
    (out / CONVERTED_CONFIG).write_text(json.dumps({**model.cfg.to_dict(), "voice": voice,
                                                    "source": str(Path(model_dir).resolve())}, indent=2))
    return out / CONVERTED_WEIGHTS


def load_converted_checkpoint(path: str | Path) -> T3ForTRT:
    """Load what :func:`convert_checkpoint` wrote (a folder or the ``.safetensors`` file)."""
    import json
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / CONVERTED_WEIGHTS if path.is_dir() else path
    meta = json.loads((folder / CONVERTED_CONFIG).read_text())
    fields = {k: meta[k] for k in T3ForTRTConfig.__dataclass_fields__ if k in meta}
    model = T3ForTRT(T3ForTRTConfig(**fields))
    sd = load_file(str(weights))
    prefix = sd.pop("voice_prefix", None)
    sd["voice_prefix"] = torch.zeros(0, model.cfg.n_embd)
    model.load_state_dict(sd, strict=True, assign=True)
    if prefix is not None and prefix.shape[0] > 0:
        model.set_voice_prefix(prefix)
    return model.eval()


__all__ = ["T3ForTRTConfig", "T3ForTRT", "create_t3_for_trt", "convert_checkpoint", "convert_state_dict",
           "load_converted_checkpoint", "process_logits", "sample_next"]
