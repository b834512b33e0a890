"""The padded flow: rows of different lengths in one window equal each row run alone."""
from __future__ import annotations

import torch


def test_padded_rows_equal_unpadded_rows(tiny_model, tiny_voice):
    m, v = tiny_model, tiny_voice
    ratio, Tp = m.cfg.token_mel_ratio, v.n_prompt_tokens
    g = torch.Generator().manual_seed(0)
    # (real tokens after the prompt, look-ahead tokens dropped before the decoder): a final row
    # (no look-ahead), a first-chunk-like row, a long row
    rows = [(9, 0), (7, 3), (30, 3)]
    T = Tp + max(n for n, _ in rows) + 2  # two more positions of pure padding
    tokens = torch.randint(0, m.cfg.vocab_size, (len(rows), T), generator=g)
    tokens[:, :Tp] = v.prompt_token[0]
    noise = torch.randn(len(rows), m.cfg.n_mels, ratio * T, generator=g)
    spk = m.flow.speaker(v.embedding).expand(len(rows), -1)
    feat = v.prompt_feat.expand(len(rows), -1, -1)
    tok_len = torch.tensor([Tp + n for n, _ in rows])
    mel_len = torch.tensor([ratio * (Tp + n - la) for n, la in rows])
    with torch.inference_mode():
        padded = m.flow.forward_padded(tokens, feat, spk, noise, tok_len, mel_len)
        for b, (n, la) in enumerate(rows):
            alone = m.flow(tokens[b:b + 1, :Tp + n], feat[:1], spk[:1], noise[b:b + 1], drop_tail_frames=ratio * la)
            k = ratio * (n - la)
            assert alone.shape[-1] == k
            torch.testing.assert_close(padded[b, :, :k], alone[0], rtol=1e-4, atol=1e-4)
    # what the padding holds does not matter: other pad tokens and pad noise, same real frames
    other = tokens.clone()
    noise2 = noise.clone()
    for b, n in enumerate(tok_len.tolist()):
        other[b, n:] = torch.randint(0, m.cfg.vocab_size, (T - n,), generator=g)
        noise2[b, :, ratio * n:] = torch.randn(m.cfg.n_mels, ratio * (T - n), generator=g)
    with torch.inference_mode():
        again = m.flow.forward_padded(other, feat, spk, noise2, tok_len, mel_len)
    for b, (n, la) in enumerate(rows):
        k = ratio * (n - la)
        torch.testing.assert_close(again[b, :, :k], padded[b, :, :k], rtol=1e-5, atol=1e-5)
