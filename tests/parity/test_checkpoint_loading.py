"""The real 6.9 GB SDXL single-file path (issue "End-to-end parity"): slow, runs in the slow CI step.

The parity checkpoint (``shared/parity/make_checkpoint.py``, about 4 min on 2 cores; or the file
named by ``$HOOOCUS_PARITY_CHECKPOINT``) is loaded into float32 models in a fresh process, which
reports its peak RSS and how far our CLIP, UNet and VAE outputs land from Fooocus's recorded ones
(parity run c: its empty negative prompt has all weights 1, so its conditioning is plain CLIP
output; ``unet00`` is fed the recorded inputs and ADM vector).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import REPO_ROOT, fooocus_data_dir, parity_dir

CHILD = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from engine.sdxl.models.loading import load_sdxl

checkpoint, tokenizer_dir, run = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
c = load_sdxl(checkpoint, tokenizer_dir=tokenizer_dir, dtype="float32")
peak_mb = next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
model_bytes = sum(p.numel() * p.element_size() for m in (c.unet, c.vae, c.text_encoder, c.text_encoder_2)
                  for p in m.parameters())
cond, traj = load_file(run / "conditioning.safetensors"), load_file(run / "trajectory.safetensors")
rel = lambda a, b: float((a - b).norm() / b.norm())
with torch.no_grad():
    l = c.text_encoder(torch.tensor([[49406] + [49407] * 76]), output_hidden_states=True).hidden_states[-2]
    g = c.text_encoder_2(torch.tensor([[49406, 49407] + [0] * 75]), output_hidden_states=True)
    y = traj["unet00.y"]

    class RecordedTimeEmbedding(torch.nn.Module):  # the 6 size embeddings exactly as Fooocus built them
        def forward(self, flat_time_ids):
            return y[:, 1280:].reshape(-1, 256)

    c.unet.add_time_proj = RecordedTimeEmbedding()
    eps = c.unet(traj["unet00.x_in"], traj["unet00.timestep"],
                 encoder_hidden_states=torch.cat([cond["negative.cond"], cond["positive.cond"]]),
                 added_cond_kwargs={"text_embeds": y[:, :1280], "time_ids": torch.zeros(2, 6)}).sample
    image = ((c.vae.decode(load_file(run / "latent.safetensors")["latent_vae_space"]).sample + 1) / 2).clamp(0, 1)
print(json.dumps({
    "peak_rss_mb": peak_mb, "model_mb": model_bytes // 2**20,
    "cond": rel(torch.cat([l, g.hidden_states[-2]], -1), cond["negative.cond"]),
    "pooled": rel(g.text_embeds, cond["negative.pooled"]),
    "eps": rel(eps, traj["unet00.eps"]),
    "image": rel(image.permute(0, 2, 3, 1), load_file(run / "decoded_float.safetensors")["image"]),
}))
"""


@pytest.mark.slow
def test_full_size_checkpoint_loads_lean_and_matches_fooocus(parity_checkpoint: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(parity_checkpoint), str(fooocus_data_dir() / "clip_tokenizer"),
         str(parity_dir() / "runs" / "c_nostyle_euler_a")],
        check=True, capture_output=True, text=True, cwd=REPO_ROOT, timeout=1800)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    file_mb = parity_checkpoint.stat().st_size // 2**20
    # Never the whole fp16 file next to the float32 models: measured 15.1 GB for 13.2 GiB of models.
    assert report["peak_rss_mb"] < report["model_mb"] + file_mb // 2, report
    # Parity README tolerances: conditioning 1e-5, unet00 eps 1e-5, decoded image ~2e-5.
    assert report["cond"] <= 1e-5 and report["pooled"] <= 1e-5, report
    assert report["eps"] <= 1e-5, report
    assert report["image"] <= 2e-5, report
