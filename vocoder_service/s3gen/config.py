"""S3Gen configuration: one dataclass for the whole vocoder model (encoder, decoder, HiFT).

``S3GenConfig.preset("turbo")`` is the architecture of upstream's ``S3Gen(meanflow=True)``
(the shapes of ``s3gen_meanflow.safetensors``); ``preset("tiny")`` has the same structure with
small widths and few blocks, for fast tests (upstream cannot load it).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

SPEECH_VOCAB_SIZE = 6561  # valid speech token ids are 0..6560
SAMPLE_RATE = 24_000
SILENCE_TOKEN = 4299  # upstream's S3GEN_SIL


@dataclass(frozen=True)
class S3GenConfig:
    # token embedding + upsample conformer encoder
    vocab_size: int = SPEECH_VOCAB_SIZE
    enc_dim: int = 512                 # token embedding width = conformer width
    enc_heads: int = 8
    enc_ffn: int = 2048
    enc_blocks: int = 6                # conformer blocks at token rate (25 Hz)
    enc_up_blocks: int = 4             # conformer blocks at mel rate (50 Hz)
    pre_lookahead: int = 3             # tokens of right context of the look-ahead conv
    token_mel_ratio: int = 2           # mel frames per token
    spk_dim: int = 192                 # x-vector width in conds.pt
    # mel / flow matching decoder (meanflow U-net estimator)
    n_mels: int = 80
    dec_channels: int = 256
    dec_head_dim: int = 64
    dec_heads: int = 8
    dec_transformers: int = 4          # transformer blocks per U-net stage
    dec_mid_blocks: int = 12
    n_flow_steps: int = 2              # meanflow Euler steps (Turbo uses 2)
    # HiFT vocoder
    hift_channels: int = 512
    hift_harmonics: int = 8
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernels: tuple[int, ...] = (16, 11, 7)
    resblock_kernels: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernels: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    istft_n_fft: int = 16
    istft_hop: int = 4
    f0_channels: int = 512
    sine_amp: float = 0.1
    noise_std: float = 0.003
    voiced_threshold: float = 10.0
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    sample_rate: int = SAMPLE_RATE

    @property
    def dec_in_channels(self) -> int:
        """Estimator input: noisy mel, encoder mu, speaker, prompt cond (4 x n_mels)."""
        return 4 * self.n_mels

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.dec_channels

    @property
    def hop_samples(self) -> int:
        """Audio samples per mel frame (480 at 24 kHz)."""
        n = self.istft_hop
        for r in self.upsample_rates:
            n *= r
        return n

    @property
    def samples_per_token(self) -> int:
        """Audio samples per speech token (960 at 24 kHz)."""
        return self.hop_samples * self.token_mel_ratio

    @staticmethod
    def preset(name: str) -> "S3GenConfig":
        if name == "turbo":
            return S3GenConfig()
        if name == "tiny":
            return replace(
                S3GenConfig(),
                enc_dim=64, enc_heads=2, enc_ffn=128, enc_blocks=2, enc_up_blocks=2,
                dec_channels=64, dec_head_dim=16, dec_heads=2, dec_transformers=1, dec_mid_blocks=2,
                hift_channels=64, f0_channels=32,
            )
        raise ValueError(f"unknown S3Gen preset {name!r}; expected 'turbo' or 'tiny'")

    @staticmethod
    def from_state_dict_shapes(shapes: dict[str, tuple[int, ...]]) -> "S3GenConfig":
        """Pick the preset whose embedding width matches ``flow.input_embedding.weight``."""
        width = shapes["flow.input_embedding.weight"][1]
        for name in ("turbo", "tiny"):
            cfg = S3GenConfig.preset(name)
            if cfg.enc_dim == width:
                cfg_hift = shapes.get("mel2wav.conv_pre.bias", (cfg.hift_channels,))[0]
                if cfg_hift == cfg.hift_channels:
                    return cfg
        raise ValueError(f"no S3Gen preset has embedding width {width}")
