"""HiFT vocoder: mel (50 Hz) -> 24 kHz waveform (neural source filter + iSTFT head).

Pipeline: ``f0_predictor`` (mel -> F0 per frame) -> F0 repeated to sample rate -> harmonic sine
source (``m_source``) -> STFT of the source injected at every upsampling stage of a HiFi-GAN
generator -> magnitude/phase of a 16-point iSTFT (hop 4).  Parameter names follow upstream's keys
under ``mel2wav.``.

Weight norm: the convolutions keep ``torch.nn.utils.parametrizations.weight_norm`` so the state
dict has upstream's ``parametrizations.weight.original0/1`` keys and loads strictly both ways
(the tiny demo weights are saved from this module).  ``fold_weight_norm()`` removes the
parametrization in place for inference (same numbers, one fewer op per conv); after folding the
state dict has plain ``weight`` keys, so fold only after loading.

Randomness: the source has a random start phase per harmonic (harmonic 0 fixed at 0) and
Gaussian noise per sample; both are arguments (``SourceNoise``) so runs are reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from .config import S3GenConfig


@dataclass
class SourceNoise:
    """Random inputs of the harmonic source.

    phase: (B, H+1, 1) start phase per harmonic in [-pi, pi), row 0 ignored (set to 0);
    noise: (B, H+1, L) standard normal noise per sample.
    """

    phase: torch.Tensor
    noise: torch.Tensor

    @staticmethod
    def draw(batch: int, harmonics: int, length: int, generator: torch.Generator | None = None,
             device=None) -> "SourceNoise":
        """Draw in upstream's order: phase uniform [-pi, pi) first, then the per-sample noise."""
        phase = torch.rand(batch, harmonics, 1, generator=generator, device=device) * (2 * math.pi) - math.pi
        noise = torch.randn(batch, harmonics, length, generator=generator, device=device)
        return SourceNoise(phase, noise)


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, alpha per channel (linear scale)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.view(1, -1, 1)
        return x + (1.0 / (a + 1e-9)) * torch.sin(x * a).pow(2)


def _wn_conv(cin: int, cout: int, k: int, dilation: int = 1, padding: int | None = None) -> nn.Module:
    pad = (k * dilation - dilation) // 2 if padding is None else padding
    return weight_norm(nn.Conv1d(cin, cout, k, 1, dilation=dilation, padding=pad))


class SnakeResBlock(nn.Module):
    """Per dilation d: x + conv2(snake(conv1_d(snake(x))))."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(_wn_conv(channels, channels, kernel, d) for d in dilations)
        self.convs2 = nn.ModuleList(_wn_conv(channels, channels, kernel, 1) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + c2(a2(c1(a1(x))))
        return x


class F0Predictor(nn.Module):
    """5 x (weight-normed conv3 + ELU) -> linear -> |.|: mel (B, n_mels, T) -> F0 in Hz (B, T)."""

    def __init__(self, n_mels: int, channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [_wn_conv(n_mels if i == 0 else channels, channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1).abs()


class HarmonicSource(nn.Module):
    """F0 at sample rate -> merged excitation: tanh(linear over harmonics of (sine*uv + noise))."""

    def __init__(self, cfg: S3GenConfig):
        super().__init__()
        self.harmonics = cfg.hift_harmonics + 1
        self.sample_rate = cfg.sample_rate
        self.sine_amp, self.noise_std, self.threshold = cfg.sine_amp, cfg.noise_std, cfg.voiced_threshold
        self.l_linear = nn.Linear(self.harmonics, 1)

    def sines(self, f0: torch.Tensor, rnd: SourceNoise, cycles0: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """f0: (B, L) Hz per sample -> (harmonic waves (B, H+1, L), end cycles (B, H+1)).

        ``cycles0`` (B, H+1): fractional cycles already run before this span (streaming); the
        returned end cycles continue it.
        """
        mult = torch.arange(1, self.harmonics + 1, device=f0.device, dtype=f0.dtype).view(1, -1, 1)
        cycles = torch.cumsum(f0.unsqueeze(1) * mult / self.sample_rate, dim=-1)
        if cycles0 is not None:
            cycles = cycles + cycles0.unsqueeze(-1)
        cycles = cycles % 1
        phase = rnd.phase.clone()
        phase[:, 0] = 0
        waves = self.sine_amp * torch.sin(2 * math.pi * cycles + phase)
        uv = (f0 > self.threshold).to(f0.dtype).unsqueeze(1)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        waves = waves * uv + noise_amp * rnd.noise
        return waves, cycles[:, :, -1]

    def forward(self, f0: torch.Tensor, rnd: SourceNoise, cycles0: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """f0: (B, L) -> (excitation (B, 1, L), end cycles (B, H+1))."""
        waves, end = self.sines(f0, rnd, cycles0)
        return torch.tanh(self.l_linear(waves.transpose(1, 2))).transpose(1, 2), end


def overlap_add_istft(spec: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor) -> torch.Tensor:
    """``torch.istft(spec, n_fft, hop, n_fft, window, center=True)`` without its host sync.

    spec: (B, n_fft//2+1, T) complex -> (B, hop*(T-1)). ``torch.istft`` checks the window
    envelope on the host (a device -> host read), which a CUDA graph cannot capture; this is the
    same inverse (irfft, window, overlap-add, divide by the summed squared window, trim n_fft/2
    on both sides) in device-only ops. Equal to ``torch.istft`` to float rounding.
    """
    T = spec.size(-1)
    frames = torch.fft.irfft(spec, n=n_fft, dim=1) * window.view(1, -1, 1)  # (B, n_fft, T)
    length = n_fft + hop * (T - 1)
    fold = dict(output_size=(1, length), kernel_size=(1, n_fft), stride=(1, hop))
    y = F.fold(frames, **fold).view(spec.size(0), length)
    env = F.fold((window * window).view(1, -1, 1).expand(1, n_fft, T), **fold).view(1, length)
    half = n_fft // 2
    return y[:, half:length - half] / env[:, half:length - half]


class HiFTGenerator(nn.Module):
    def __init__(self, cfg: S3GenConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.hift_channels
        self.n_fft, self.hop = cfg.istft_n_fft, cfg.istft_hop
        self.frame_samples = cfg.hop_samples
        self.m_source = HarmonicSource(cfg)
        self.conv_pre = _wn_conv(cfg.n_mels, C, 7, padding=3)
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(C // 2**i, C // 2**(i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernels))
        )
        rates = [1] + list(cfg.upsample_rates[::-1][:-1])
        cum = [math.prod(rates[:i + 1]) for i in range(len(rates))][::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(cum, cfg.source_resblock_kernels, cfg.source_resblock_dilations)):
            ch = C // 2**(i + 1)
            if u == 1:
                self.source_downs.append(nn.Conv1d(self.n_fft + 2, ch, 1, 1))
            else:
                self.source_downs.append(nn.Conv1d(self.n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(SnakeResBlock(ch, k, tuple(d)))
        self.resblocks = nn.ModuleList(
            SnakeResBlock(C // 2**(i + 1), k, tuple(d))
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernels, cfg.resblock_dilations)
        )
        self.conv_post = _wn_conv(C // 2**len(self.ups), self.n_fft + 2, 7, padding=3)
        self.f0_predictor = F0Predictor(cfg.n_mels, cfg.f0_channels)
        n = torch.arange(self.n_fft, dtype=torch.float64)
        window = (0.5 - 0.5 * torch.cos(2 * math.pi * n / self.n_fft)).float()  # periodic Hann
        self.register_buffer("stft_window", window, persistent=False)
        self.graph_safe_istft = False  # set by accel.prepare_s3gen(cuda_graphs=True)

    def fold_weight_norm(self) -> None:
        """Replace each weight-norm parametrization by its current weight (inference only)."""
        for m in self.modules():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)

    def f0_at_samples(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, n_mels, T) -> F0 repeated per sample (B, T * frame_samples)."""
        return self.f0_predictor(mel).repeat_interleave(self.frame_samples, dim=1)

    def f0_source(self, mel: torch.Tensor, phase: torch.Tensor, noise_index: torch.Tensor, cycles0: torch.Tensor,
                  skip_frames: int = 0, end_sample: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A streaming step's F0 -> harmonic source in one call (one CUDA graph when captured).

        mel: (B, n_mels, T); the F0 of its first ``skip_frames`` frames is dropped (left context).
        phase: (B, H+1, 1) start phases; noise_index: (B, 2) int64 (key, first sample) of the
        positional source noise (``noise.hashed_normal``, hashed here); cycles0: (B, H+1) cycles
        run before. Returns the excitation of the new samples (B, 1, L) and the cycles (mod 1) at
        sample ``end_sample - 1`` of them, (B, H+1) (``cycles0`` when ``end_sample`` is 0).
        """
        from .noise import hashed_normal

        f0 = self.f0_at_samples(mel)[:, skip_frames * self.frame_samples:]
        src = self.m_source
        noise = hashed_normal(noise_index[:, 0], noise_index[:, 1], f0.size(1), src.harmonics)
        excitation, _ = src(f0, SourceNoise(phase, noise), cycles0)
        if end_sample <= 0:
            return excitation, cycles0.clone()
        mult = torch.arange(1, src.harmonics + 1, device=f0.device, dtype=f0.dtype).view(1, -1, 1)
        cycles = (torch.cumsum(f0.unsqueeze(1) * mult / src.sample_rate, dim=-1) + cycles0.unsqueeze(-1)) % 1
        return excitation, cycles[:, :, end_sample - 1]

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel (B, n_mels, T), excitation (B, 1, T*frame_samples) -> audio (B, T*frame_samples)."""
        spec = torch.stft(source.squeeze(1), self.n_fft, self.hop, self.n_fft, window=self.stft_window,
                          return_complex=True)
        re, im = self.spectrum(mel, torch.cat([spec.real, spec.imag], dim=1))
        spec = torch.complex(re, im)
        if self.graph_safe_istft:
            audio = overlap_add_istft(spec, self.n_fft, self.hop, self.stft_window)
        else:
            audio = torch.istft(spec, self.n_fft, self.hop, self.n_fft, window=self.stft_window)
        return audio.clamp(-self.cfg.audio_limit, self.cfg.audio_limit)

    def spectrum(self, mel: torch.Tensor, source_stft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator between the STFTs: mel (B, n_mels, T) and the excitation's STFT as
        [real | imag] (B, 2·(n_fft/2+1), T') -> the output spectrum's (real, imag), each (B, n_fft/2+1, T').

        Shared by :meth:`decode` (torch.stft / istft) and the ONNX graph (DFT convolutions)."""
        x = self.conv_pre(mel)
        nk = len(self.cfg.resblock_kernels)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](source_stft))
            acc = self.resblocks[i * nk](x)
            for j in range(1, nk):
                acc = acc + self.resblocks[i * nk + j](x)
            x = acc / nk
        x = self.conv_post(F.leaky_relu(x))
        half = self.n_fft // 2 + 1
        mag = torch.exp(x[:, :half]).clamp(max=1e2)
        ph = torch.sin(x[:, half:])
        return mag * torch.cos(ph), mag * torch.sin(ph)

    def forward(self, mel: torch.Tensor, rnd: SourceNoise) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, n_mels, T) -> (audio (B, T*frame_samples), excitation (B, 1, T*frame_samples))."""
        source, _ = self.m_source(self.f0_at_samples(mel), rnd)
        return self.decode(mel, source), source
