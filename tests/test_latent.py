"""Latent DDMs: the autoencoder codec against diffusers itself, a pretrained folder copied into the run,
an autoencoder trained by ddmkit, and a latent run end to end from the command line."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ddmkit.config import LatentConfig, RunConfig, load_config, validate  # noqa: E402
from ddmkit.errors import DDMError  # noqa: E402
from ddmkit.io import load_tensors, sha256_file  # noqa: E402
from ddmkit.latent import LatentCodec, build_autoencoder, latent_shape, load_autoencoder  # noqa: E402
from ddmkit.latent.autoencoder import planned_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_images import write_idx_set  # noqa: E402


def tiny_autoencoder(in_channels: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    return build_autoencoder(LatentConfig(channels=2, widths=[8, 8, 8]), in_channels, 32)


def test_codec_matches_diffusers_with_shift_and_scale():
    ae = tiny_autoencoder().eval()
    ae.register_to_config(scaling_factor=2.5, shift_factor=0.3)
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    codec = LatentCodec(ae, 1, batch=2)  # batches of 2: the split must not change the result
    z = codec.encode(x)
    with torch.no_grad():
        want = (ae.encode(x).latent_dist.mean - 0.3) * 2.5
        back = ae.decode(z / 2.5 + 0.3).sample
    assert z.shape == (5, 2, 8, 8)
    torch.testing.assert_close(z, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(codec.decode(z), back, atol=1e-5, rtol=1e-4)


def test_grey_images_through_an_rgb_autoencoder():
    ae = tiny_autoencoder(in_channels=3).eval()
    codec = LatentCodec(ae, data_channels=1)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        want = ae.encode(x.repeat(1, 3, 1, 1)).latent_dist.mean * ae.config.scaling_factor
        rgb = ae.decode(want / ae.config.scaling_factor).sample
    torch.testing.assert_close(codec.encode(x), want, atol=1e-5, rtol=1e-4)
    out = codec.decode(want)
    assert out.shape == (3, 1, 32, 32)
    torch.testing.assert_close(out, rgb.mean(1, keepdim=True), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad, message", [
    (lambda: torch.zeros(2, 2, 8, 8), r"images \(N, C, H, W\) with C in \[1\] expected, got shape \(2, 2, 8, 8\) "
                                      r"\(latents are decoded with decode\)"),
    (lambda: torch.full((2, 1, 32, 32), 200, dtype=torch.uint8), r"floats in \[-1, 1\] expected, got torch.uint8"),
    (lambda: torch.full((2, 1, 32, 32), float("nan")), "NaN or infinite"),
    (lambda: torch.full((2, 1, 32, 32), 0.5) * 255, r"values reach 127.5"),
    (lambda: torch.zeros(2, 1, 30, 30), r"H and W must be multiples of 4 .* got 30x30"),
])
def test_the_codec_refuses_what_it_cannot_encode(bad, message):
    """ddm.codec.encode took latents, 0..255 images, NaN and sizes it cannot halve twice, silently or with
    torch's own errors."""
    codec = LatentCodec(tiny_autoencoder().eval(), 1)
    with pytest.raises(DDMError, match=message):
        codec.encode(bad())
    with pytest.raises(DDMError, match=r"decode: latents \(N, 2, h, w\) expected, got shape \(2, 1, 32, 32\)"):
        codec.decode(torch.zeros(2, 1, 32, 32))


def test_latent_shape_and_its_checks():
    config = {"_class_name": "AutoencoderKL", "in_channels": 3, "latent_channels": 4,
              "block_out_channels": [128, 256, 512, 512]}
    assert latent_shape(config, (3, 256, 256)) == (4, 32, 32)
    assert latent_shape(config, (1, 64, 64)) == (4, 8, 8)  # grey data through an RGB autoencoder
    for image, side in (((3, 28, 28), 32), ((3, 20, 36), 40)):  # the pad_to named is one that works
        with pytest.raises(DDMError, match=f"set data.params.pad_to = {side} "):
            latent_shape(config, image)
        assert latent_shape(config, (3, side, side)) == (4, side // 8, side // 8)
    with pytest.raises(DDMError, match="latent.enabled"):
        latent_shape(config, (8,))


def test_a_pretrained_folder_loads_safetensors_only(tmp_path):
    ae = tiny_autoencoder()
    ae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded = load_autoencoder(tmp_path / "vae")
    assert all(torch.equal(a, b) for a, b in zip(ae.state_dict().values(), loaded.state_dict().values()))
    ae.save_pretrained(tmp_path / "pickled", safe_serialization=False)  # a .bin file: pickle, never loaded
    with pytest.raises(DDMError, match="safetensors"):
        load_autoencoder(tmp_path / "pickled")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(DDMError, match="not an AutoencoderKL"):
        load_autoencoder(tmp_path / "other")
    with pytest.raises(DDMError, match="does not exist"):
        load_autoencoder(tmp_path / "missing")
    ae.save_pretrained(tmp_path / "variant", safe_serialization=True, variant="fp16")  # diffusers' raw OSError
    with pytest.raises(DDMError, match=r"holds diffusion_pytorch_model.fp16.safetensors, a 'fp16' variant.*"
                                       r"variant='fp16'\).save_pretrained\(NEW_FOLDER\)"):
        load_autoencoder(tmp_path / "variant")
    ae.save_pretrained(tmp_path / "pipeline" / "vae", safe_serialization=True)  # a Stable Diffusion-style folder
    with pytest.raises(DDMError, match="set latent.pretrained to its vae/ sub-folder"):
        load_autoencoder(tmp_path / "pipeline")
    run = tmp_path / "run"  # a latent run given for its autoencoder: it said "names no diffusers class (a
    ae.save_pretrained(run / "autoencoder", safe_serialization=True)  # transformers model?)"
    (run / "config.json").write_text(json.dumps({"config": {}, "digest": "0"}))
    with pytest.raises(DDMError, match=r"run/config.json is a ddmkit run's config, not an AutoencoderKL \(it holds "
                                       r"autoencoder/config.json: a latent run's folder; set latent.pretrained to its "
                                       r"autoencoder/ sub-folder\)"):
        load_autoencoder(run)
    assert load_autoencoder(run / "autoencoder") is not None
    (run / "expert").mkdir()
    (run / "expert" / "config.json").write_text(json.dumps({"arch": "dit"}))
    with pytest.raises(DDMError, match=r"config.json is a ddmkit model's config \(arch 'dit'\), not an AutoencoderKL"):
        load_autoencoder(run / "expert")


def test_an_autoencoder_folder_given_as_a_run_is_named_a_model_folder(tmp_path):
    """DDM.from_pretrained and `ddmkit verify` on a saved autoencoder said to write a partition or a registry
    into it."""
    from ddmkit import DDM

    tiny_autoencoder().save_pretrained(tmp_path / "vae", safe_serialization=True)
    said = f"{tmp_path / 'vae'} is a model folder (config.json + diffusion_pytorch_model.safetensors), not a run folder"
    with pytest.raises(DDMError, match=re.escape(said)):
        DDM.from_pretrained(tmp_path / "vae")
    done = run_cli("verify", tmp_path / "vae")
    assert isinstance(done.exception, DDMError) and str(done.exception).startswith(said), done.output
    written = ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == written


def test_latent_settings_that_cannot_work_are_refused_with_the_config():
    with pytest.raises(DDMError, match=r"latent.widths.*multiples of min\(32, their smallest\) = 8"):
        validate(RunConfig, {"latent": {"enabled": True, "widths": [8, 12]}})
    with pytest.raises(DDMError, match=r"= 32 \(group norm\)"):
        validate(RunConfig, {"latent": {"enabled": True, "widths": [48, 64]}})
    assert validate(RunConfig, {"latent": {"enabled": True, "widths": [8, 16, 24]}}).latent.widths == [8, 16, 24]
    home = validate(RunConfig, {"latent": {"enabled": True, "pretrained": "~/models/vae"}}).latent.pretrained
    assert home == str(Path.home() / "models" / "vae")  # '~' was read as a folder named '~'
    with pytest.raises(DDMError, match="latent.enabled = false"):
        validate(RunConfig, {"latent": {"pretrained": "models/vae"}})


def latent_config(tmp_path: Path, pretrained: Path | None = None) -> Path:
    """A tiny latent run on a small IDX folder, written as TOML."""
    folder = write_idx_set(tmp_path / "fm", 96, 32)
    raw = load_config(ROOT / "configs" / "fashion_mnist_tiny.toml").model_dump()
    raw["data"]["params"] = {"dir": str(folder), "pad_to": 32}
    raw["sample"].update(n=16, steps=2, strategies=["monolith", "top-1", "nearest"], guidance_sweep=[],
                         stats_router_strategies=[], sweep_n=None)
    raw["evaluate"].update(missing_experts=False)
    raw["latent"] = {"enabled": True, "channels": 2, "widths": [8, 8, 8], "pretrained": None if pretrained is None
                     else str(pretrained), "train": {"steps": 6, "batch_size": 8, "warmup": 1, "log_every": 3,
                                                     "device": "cpu"}}
    cfg = validate(RunConfig, raw)
    lines = []

    def table(prefix, d):
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in scalars.items() if v is not None)
        for k, v in d.items():
            if isinstance(v, dict) and k != "params" and k != "kwargs":
                table(f"{prefix}.{k}", v)
            elif isinstance(v, dict):
                inner = ", ".join(f"{a} = {json.dumps(b)}" for a, b in v.items())
                lines.append(f"{k} = {{ {inner} }}")

    for name, section in cfg.model_dump().items():
        table(name, section)
    path = tmp_path / "latent.toml"
    path.write_text("\n".join(lines) + "\n")
    assert load_config(path) == cfg
    return path


def run_cli(*args):
    from typer.testing import CliRunner

    from ddmkit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_latent_run_end_to_end(tmp_path):
    """`ddmkit run` with an autoencoder trained by ddmkit: experts on latents, samples decoded, the
    reconstructions row in the report, the registry covering the latents."""
    from ddmkit import DDM
    from ddmkit.pipeline.models import PANELS, training_curves
    from ddmkit.pipeline.stages import load_split

    config = latent_config(tmp_path)
    result = run_cli("run", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    info = json.loads((run / "latents" / "latents.json").read_text())
    assert info["latent_shape"] == [2, 8, 8] and info["data_shape"] == [1, 32, 32] and info["source"] == "trained"
    # the shards' latents are the autoencoder's encoding of the pixel shards, row for row
    codec = LatentCodec(load_autoencoder(run / "autoencoder"), 1)
    pixels = load_tensors(run / "partition" / "shards" / "cluster_00.safetensors")
    latents = load_tensors(run / "latents" / "cluster_00.safetensors")
    torch.testing.assert_close(latents["x"], codec.encode(pixels["x"]), atol=1e-5, rtol=1e-4)
    assert torch.equal(latents["labels"], pixels["labels"])
    # a trained autoencoder's latents of the training images have mean 0 and variance 1
    z = codec.encode(load_split(run, "train").x)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-4
    for folder in ["experts/expert_00", "experts/expert_01", "monolith", "router"]:
        assert json.loads((run / folder / "config.json").read_text())["data_shape"] == [2, 8, 8]
    assert json.loads((run / "experts" / "expert_00" / "config.json").read_text())["shard_sha256"] == \
        info["shards"][0]["sha256"]
    samples = load_tensors(run / "samples" / "top-1.safetensors")["x"]
    assert samples.shape == (16, 1, 32, 32) and samples.abs().max() <= 1
    report = (run / "report.md").read_text()
    assert "autoencoder reconstructions (latent floor)" in report and (run / "plots" / "reconstructions.png").exists()
    # the autoencoder's training loss on a panel of its own
    assert list(training_curves(run)[0]) == [PANELS["experts"], PANELS["router"], PANELS["autoencoder"]]
    assert "the autoencoder's (reconstruction) each have a panel" in report and (run / "plots/training.png").exists()
    # the library call decodes too, or gives the latents
    ddm = DDM.from_pretrained(run)
    images, _ = ddm.sample("top-1", n=4, steps=2, labels=torch.zeros(4, dtype=torch.long))
    latent, _ = ddm.sample("top-1", n=4, steps=2, labels=torch.zeros(4, dtype=torch.long), decode=False)
    assert images.shape == (4, 1, 32, 32) and latent.shape == (4, 2, 8, 8)
    torch.testing.assert_close(images, ddm.codec.decode(latent))
    assert run_cli("verify", run).exit_code == 0
    kept = run / "expert_01.kept"  # a job array for the experts not trained yet: here expert 1
    shutil.move(run / "experts" / "expert_01", kept)
    assert "latents/cluster_$I" in (run_cli("launch", run, "--emit", "slurm", "--gpus", "0").exit_code == 0
                                    and (run / "launch" / "train_experts.slurm").read_text())
    assert "#SBATCH --array=1\n" in (run / "launch" / "train_experts.slurm").read_text()
    shutil.move(kept, run / "experts" / "expert_01")
    pixels = run / "partition" / "shards" / "cluster_01.safetensors"  # the shard --help showed, for a latent config
    done = run_cli("train-expert", pixels, "--config", run / "config.json", "--out", tmp_path / "e")
    assert isinstance(done.exception, DDMError) and "RUN/latents/cluster_XX.safetensors" in str(done.exception)
    done = run_cli("train-expert", run / "latents" / "cluster_01.safetensors", "--out", tmp_path / "e")
    assert isinstance(done.exception, DDMError) and "holds latents, but the config has no [latent]" in \
        str(done.exception)
    assert not (tmp_path / "e").exists()
    # sampling needs latents.json, not the latent shards; without it, it names that one file (it said to copy
    # the whole latents/ folder back), and the other fix it gives (encode again) restores the shards too
    for c in (0, 1):
        (run / "latents" / f"cluster_{c:02d}.safetensors").unlink()
    assert DDM.from_pretrained(run).sample("top-1", n=2, steps=2)[0].shape == (2, 1, 32, 32)
    info = run / "latents" / "latents.json"  # lost: named as missing, not as changed
    kept = info.read_bytes()
    info.unlink()
    with pytest.raises(DDMError, match=r"latents\.json is missing; copy that one file back \(loading and sampling "
                                       r"need only it; .*`ddmkit partition --config .*config.json --out "):
        DDM.from_pretrained(run)
    assert run_cli("partition", "--config", run / "config.json", "--out", run).exit_code == 0
    assert info.read_bytes() == kept and run_cli("verify", run).exit_code == 0
    from ddmkit.registry import verify_registry
    info.write_text(json.dumps(json.loads(kept), indent=1))  # the same records in other bytes: its SHA-256 differs
    with pytest.raises(DDMError, match=r"the latent shards \(.*latents\.json\) changed since the registry was "
                                       "written; these networks were trained on other latents"):
        verify_registry(run)
    info.write_bytes(kept)
    # replace-expert and add-expert refuse a latent run with what does work (they said to train a new run with the
    # new data, which replaces no expert): an expert trained on the slot's latents, put in place and registered
    done = run_cli("replace-expert", run, 1, run / "experts" / "expert_00")
    assert isinstance(done.exception, DDMError), done.output
    message = " ".join(str(done.exception).split())
    train = f"`ddmkit train-expert {run / 'latents' / 'cluster_01.safetensors'} --config {run / 'config.json'} " \
        "--out NEW`"
    assert train in message and f"in place of {run / 'experts' / 'expert_01'} and run `ddmkit register {run}`" in \
        message, message
    assert run_cli("train-expert", run / "latents" / "cluster_01.safetensors", "--config", run / "config.json",
                   "--out", tmp_path / "e7", "--seed", 7).exit_code == 0
    shutil.rmtree(run / "experts" / "expert_01")
    shutil.copytree(tmp_path / "e7", run / "experts" / "expert_01")
    assert run_cli("register", run).exit_code == 0 and run_cli("verify", run).exit_code == 0
    assert DDM.from_pretrained(run).sample("top-1", n=2, steps=2)[0].shape == (2, 1, 32, 32)
    done = run_cli("add-expert", run, "--data", tmp_path / "island.npy")
    assert isinstance(done.exception, DDMError) and f'latent.pretrained = "{run / "autoencoder"}" in its config to ' \
        "keep this run's autoencoder" in " ".join(str(done.exception).split()), done.output
    done = run_cli("partition", "--config", run / "config.json", "--out", tmp_path / "again", "--set",
                   f"latent.pretrained={run / 'autoencoder'}")  # the new run that it says to make: the same latents
    assert done.exit_code == 0 and (tmp_path / "again" / "latents" / "cluster_00.safetensors").read_bytes() == \
        (run / "latents" / "cluster_00.safetensors").read_bytes(), done.output
    # an autoencoder config whose latent scale or shift was edited after encoding (verify passed, samples were
    # decoded at the wrong scale)
    settings = run / "autoencoder" / "config.json"
    kept = settings.read_text()
    for name in ("scaling_factor", "shift_factor"):
        settings.write_text(json.dumps({**json.loads(kept), name: 5.0}))
        with pytest.raises(DDMError, match=rf"config\.json: {name} = 5\.0, but the shards were encoded with .*Set it "
                                           r"back to"):
            DDM.from_pretrained(run)
        assert isinstance(run_cli("verify", run).exception, DDMError)
    settings.write_text(kept)
    assert run_cli("verify", run).exit_code == 0
    # an autoencoder changed after encoding is refused before anything is built
    weights = run / "autoencoder" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(DDMError, match=r"autoencoder was changed.*Put that autoencoder back into .*autoencoder, or "
                                       r"make the run again .*--out NEW_RUN"):  # it said to remove both and re-run,
        DDM.from_pretrained(run)  # which the registered run then refused (latents.json missing)


def test_a_pretrained_autoencoder_is_copied_and_used(tmp_path):
    ae = tiny_autoencoder(seed=3)
    ae.register_to_config(scaling_factor=1.7, shift_factor=0.0)
    ae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    config = latent_config(tmp_path, pretrained=tmp_path / "vae")
    result = run_cli("partition", "--config", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    copied = load_autoencoder(run / "autoencoder")
    assert all(torch.equal(a, b) for a, b in zip(ae.state_dict().values(), copied.state_dict().values()))
    info = json.loads((run / "latents" / "latents.json").read_text())
    assert info["source"] == str(tmp_path / "vae") and info["scaling_factor"] == pytest.approx(1.7)
    assert info["autoencoder_sha256"] == sha256_file(run / "autoencoder" / "diffusion_pytorch_model.safetensors")
    pixels = load_tensors(run / "partition" / "shards" / "cluster_01.safetensors")["x"]
    torch.testing.assert_close(load_tensors(run / "latents" / "cluster_01.safetensors")["x"],
                               LatentCodec(ae.eval(), 1).encode(pixels), atol=1e-5, rtol=1e-4)
    again = run_cli("partition", "--config", config, "--out", run)  # nothing changed: nothing said
    assert again.exit_code == 0 and "changed since" not in again.output, again.output
    # the folder retrained in place: the run keeps its copy, and says so (it said nothing, exit 0)
    before = sha256_file(run / "autoencoder" / "diffusion_pytorch_model.safetensors")
    tiny_autoencoder(seed=4).save_pretrained(tmp_path / "vae", safe_serialization=True)
    result = run_cli("partition", "--config", config, "--out", run)
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "changed since the run copied the autoencoder" in said, result.output
    assert sha256_file(run / "autoencoder" / "diffusion_pytorch_model.safetensors") == before


def test_a_lost_autoencoder_is_named_with_the_fix_that_works(tmp_path, monkeypatch, capsys):
    """A run copied without RUN/autoencoder/ (or its config.json): every command said 'copy it back or re-create
    it' (or 're-create it with the ddmkit command that wrote it'), and `ddmkit partition` on the run refused again."""
    tiny_autoencoder().save_pretrained(tmp_path / "vae", safe_serialization=True)
    config = latent_config(tmp_path, pretrained=tmp_path / "vae")
    run = tmp_path / "run"
    assert exit_code(monkeypatch, capsys, "partition", "--config", config, "--out", run)[0] == 0
    shutil.move(run / "autoencoder", tmp_path / "kept")
    code, out = exit_code(monkeypatch, capsys, "partition", "--config", config, "--out", run)
    assert code == 2 and f"{run / 'autoencoder' / 'diffusion_pytorch_model.safetensors'} and " \
        f"{run / 'autoencoder' / 'config.json'} are missing: the run's autoencoder" in out, out
    assert "copy the run's autoencoder/ folder back whole" in out and "re-create" not in out
    shutil.move(tmp_path / "kept", run / "autoencoder")
    (run / "autoencoder" / "config.json").rename(tmp_path / "config.json")
    code, out = exit_code(monkeypatch, capsys, "partition", "--config", config, "--out", run)
    assert code == 2 and f"{run / 'autoencoder' / 'config.json'} is missing: the run's autoencoder" in out, out
    (tmp_path / "config.json").rename(run / "autoencoder" / "config.json")
    assert exit_code(monkeypatch, capsys, "partition", "--config", config, "--out", run)[0] == 0


def exit_code(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`ddmkit ARGS` through its entry point, in this process: (exit code, what it printed)."""
    import ddmkit.cli as cli_module

    monkeypatch.setattr(sys, "argv", ["ddmkit", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli_module.main()
    out = capsys.readouterr()
    return info.value.code, " ".join((out.out + out.err).split())


def test_bad_latent_settings_exit_2_before_anything_is_written(tmp_path, monkeypatch, capsys):
    config = latent_config(tmp_path, pretrained=tmp_path / "no-such-vae")
    code, out = exit_code(monkeypatch, capsys, "run", config, "--out", tmp_path / "run")
    assert code == 2 and "latent.pretrained" in out
    assert not (tmp_path / "run").exists()
    text = config.read_text().replace('pretrained = "' + str(tmp_path / "no-such-vae") + '"\n', "")
    odd = tmp_path / "odd.toml"
    odd.write_text(text.replace('pad_to = 32', 'pad_to = 30'))  # 30 is not a multiple of 4
    code, out = exit_code(monkeypatch, capsys, "run", odd, "--out", tmp_path / "run")
    assert code == 2 and "set data.params.pad_to = 32 " in out, out
    assert not (tmp_path / "run").exists()


def test_a_pretrained_autoencoder_with_missing_weights_is_refused_before_the_run_writes(tmp_path, monkeypatch, capsys):
    """diffusers leaves weights missing from the file as uninitialised memory (with a console warning)."""
    from safetensors.torch import load_file, save_file

    tiny_autoencoder().save_pretrained(tmp_path / "vae", safe_serialization=True)
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("decoder.conv_out")}, weights)
    with pytest.raises(DDMError, match=r"lacks weights of its AutoencoderKL \(decoder.conv_out.bias, decoder.conv_out"):
        load_autoencoder(tmp_path / "vae")
    code, out = exit_code(monkeypatch, capsys, "run", latent_config(tmp_path, tmp_path / "vae"), "--out",
                          tmp_path / "run")
    assert code == 2 and "lacks weights" in out and not (tmp_path / "run").exists()


def test_force_over_a_latent_run_checks_the_new_autoencoder_before_removing_the_old_run(tmp_path, monkeypatch, capsys):
    """With --force over a latent run the pretrained folder's check was skipped (the old run's autoencoder/
    was there): the old run was deleted and the new one failed half-written."""
    tiny_autoencoder(seed=3).save_pretrained(tmp_path / "vae", safe_serialization=True)
    run = tmp_path / "run"
    assert run_cli("partition", "--config", latent_config(tmp_path, pretrained=tmp_path / "vae"),
                   "--out", run).exit_code == 0
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    from safetensors.torch import load_file, save_file

    shutil.copytree(tmp_path / "vae", tmp_path / "broken")
    weights = tmp_path / "broken" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("decoder.conv_out")}, weights)
    other = tmp_path / "other.toml"
    other.write_text(latent_config(tmp_path, pretrained=tmp_path / "vae").read_text()
                     .replace(str(tmp_path / "vae"), str(tmp_path / "broken")))
    code, out = exit_code(monkeypatch, capsys, "run", other, "--out", run, "--force")
    assert code == 2 and "lacks weights" in out, out
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before


def test_an_autoencoder_whose_config_does_not_fit_its_weights_is_named_so(tmp_path):
    """The message was diffusers' size-mismatch text cut at 300 characters, mid-word."""
    tiny_autoencoder().save_pretrained(tmp_path / "vae", safe_serialization=True)
    config = tmp_path / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "latent_channels": 8}))
    with pytest.raises(DDMError, match=r"its weights do not fit its config.json \(encoder.conv_out.weight: "
                                       r"torch.Size\(\[4, 8, 3, 3\]\) in the weights"):
        load_autoencoder(tmp_path / "vae")


def test_an_interrupted_autoencoder_training_continues_from_its_checkpoint(tmp_path, monkeypatch):
    """latent.train.checkpoint_every was ignored: Ctrl-C lost the whole autoencoder training. Cut short after
    its step-4 checkpoint and run again, it continues from step 4 and ends with the uninterrupted training's
    weights, byte for byte; on other images the checkpoint is refused."""
    import ddmkit.train.autoencoder as job
    from ddmkit.config import TrainConfig
    from ddmkit.train.jobs import checkpoint_path
    x = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = LatentConfig(enabled=True, channels=2, widths=[8, 8, 8], encode_batch=8,
                       train=TrainConfig(steps=8, batch_size=4, warmup=2, log_every=4, checkpoint_every=4,
                                         device="cpu"))
    weights = lambda folder: (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    job.train_autoencoder(x, cfg, tmp_path / "whole")
    assert not checkpoint_path(tmp_path / "whole").exists()  # removed once the folder is written
    real = job.build_autoencoder
    with monkeypatch.context() as m:
        def stopping_after_six_batches(*a, **k):  # a Ctrl-C in the 7th step, after the step-4 checkpoint
            model, calls = real(*a, **k), {"n": 0}
            encode = model.encode

            def counted(*b, **c):
                calls["n"] += 1
                if calls["n"] > 6:
                    raise KeyboardInterrupt
                return encode(*b, **c)
            model.encode = counted
            return model
        m.setattr(job, "build_autoencoder", stopping_after_six_batches)
        with pytest.raises(KeyboardInterrupt):
            job.train_autoencoder(x, cfg, tmp_path / "cut")
    from ddmkit.io import read_metadata
    assert not (tmp_path / "cut").exists() and read_metadata(checkpoint_path(tmp_path / "cut"))["step"] == 4
    with pytest.raises(DDMError, match="other training data"):
        job.train_autoencoder(-x, cfg, tmp_path / "cut")
    job.train_autoencoder(x, cfg, tmp_path / "cut")
    assert weights(tmp_path / "cut") == weights(tmp_path / "whole")
    assert not checkpoint_path(tmp_path / "cut").exists()


def test_a_half_precision_source_is_not_called_changed_but_a_new_scale_is(tmp_path):
    """The run's copy is saved anew (float32 bytes), and the note compared the source's bytes with it: a float16
    folder was called changed at every command; a new scaling_factor in its config.json was never noted."""
    tiny_autoencoder(seed=3).half().save_pretrained(tmp_path / "vae", safe_serialization=True)
    config = latent_config(tmp_path, pretrained=tmp_path / "vae")
    assert run_cli("partition", "--config", config, "--out", tmp_path / "run").exit_code == 0
    again = run_cli("partition", "--config", config, "--out", tmp_path / "run")
    assert again.exit_code == 0 and "changed since" not in again.output, again.output
    settings = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**settings, "scaling_factor": 3.0}))
    noted = run_cli("partition", "--config", config, "--out", tmp_path / "run")
    assert noted.exit_code == 0 and f"{tmp_path / 'vae' / 'config.json'} changed since the run copied" in \
        " ".join(noted.output.split()), noted.output


def test_a_new_encode_batch_is_how_the_run_runs_not_another_run(tmp_path):
    """latent.encode_batch (also the decode batch when sampling: what a user out of memory lowers) made a
    trained run 'a different run', and the suggested --force deleted it."""
    ae = tiny_autoencoder(seed=3)
    ae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    config = latent_config(tmp_path, pretrained=tmp_path / "vae")
    assert run_cli("partition", "--config", config, "--out", tmp_path / "run").exit_code == 0
    before = sha256_file(tmp_path / "run" / "latents" / "cluster_00.safetensors")
    again = run_cli("partition", "--config", config, "--out", tmp_path / "run", "--set", "latent.encode_batch=7",
                    "--set", "partition.encoder_batch=5")
    assert again.exit_code == 0 and "different run" not in again.output, again.output
    assert sha256_file(tmp_path / "run" / "latents" / "cluster_00.safetensors") == before
    other = run_cli("partition", "--config", config, "--out", tmp_path / "run", "--set", "latent.channels=3")
    assert "already holds a different run: its config.json differs in latent.channels" in str(other.exception)


def test_register_names_the_latents_an_expert_must_take_and_the_command_that_trains_it(tmp_path, monkeypatch,
                                                                                       capsys):
    """An expert trained on another autoencoder's latents was told to 'retrain it on this run's partition (images:
    at this resolution)'; `ddmkit register` names the latents the run's networks take, of which images, and the
    train-expert command on the run's latent shard, which it then registers."""
    config = latent_config(tmp_path)
    run, other = tmp_path / "run", tmp_path / "other"
    assert run_cli("partition", "--config", config, "--out", run).exit_code == 0
    assert run_cli("partition", "--config", config, "--out", other, "--set", "latent.channels=3").exit_code == 0
    assert run_cli("train-expert", other / "latents" / "cluster_00.safetensors", "--config", other / "config.json",
                   "--out", tmp_path / "island").exit_code == 0
    shutil.copytree(tmp_path / "island", run / "experts" / "expert_00")  # an island's expert of other latents
    code, out = exit_code(monkeypatch, capsys, "register", run)
    train = f"`ddmkit train-expert {run / 'latents' / 'cluster_00.safetensors'} --config {run / 'config.json'} " \
        "--out NEW`"
    assert code == 2 and "was trained on data of shape (3, 8, 8) but this run's networks take latents of shape " \
        f"(2, 8, 8) (of 32x32 images, through the run's autoencoder, {run / 'autoencoder'}); train it again on " \
        f"them: {train}, then put NEW in place of {run / 'experts' / 'expert_00'} and run `ddmkit register {run}`" \
        in out, out
    assert not (run / "registry.json").exists()
    assert run_cli("train-expert", run / "latents" / "cluster_00.safetensors", "--config", run / "config.json",
                   "--out", tmp_path / "new").exit_code == 0  # the fix it gives
    shutil.rmtree(run / "experts" / "expert_00")
    shutil.move(tmp_path / "new", run / "experts" / "expert_00")
    assert run_cli("register", run).exit_code == 0


def test_a_latent_runs_monolith_or_router_of_other_latents_is_told_its_own_training_command(tmp_path):
    """The monolith and the router of another shape get the command that trains them (not train-expert's)."""
    from ddmkit.ddm.load import latent_fix
    from ddmkit.layout import RunFolder
    folder, info = RunFolder(tmp_path), {"latent_shape": [2, 8, 8], "data_shape": [1, 32, 32]}
    for cluster, redo in [(None, f"remove {tmp_path / 'monolith'}, then run `ddmkit train-monolith {tmp_path}`"),
                          ("router", f"remove {tmp_path / 'router'}, then run `ddmkit train-router {tmp_path}`")]:
        assert latent_fix(folder, info, cluster).endswith(f"of 32x32 images, through the run's autoencoder, "
                                                          f"{tmp_path / 'autoencoder'}); train it again on them: "
                                                          f"{redo}")


def test_a_network_that_does_not_build_names_the_latents_and_the_images_plainly(tmp_path, monkeypatch, capsys):
    """A network error in a latent run ended '(latents (the autoencoder's, of the images: the images' size sets
    theirs) of shape (2, 8, 8))'; it names the latents' shape and the images' size (32x32, f = 4) plainly."""
    config = latent_config(tmp_path)
    code, out = exit_code(monkeypatch, capsys, "run", config, "--out", tmp_path / "run",
                          "--set", "router.net.kwargs.channels=[0]")
    assert code == 2 and out.endswith("e.g. [32, 64, 128] (latents of shape (2, 8, 8): the autoencoder's, of 32x32 "
                                      "images)"), out
    assert not (tmp_path / "run").exists()


def test_a_dit_that_does_not_fit_the_latents_gives_the_image_sizes_that_do():
    """'DiT: an input of 15x15 does not split into patches of 2x2; ... or pad the data to a multiple of 2' sent a
    latent run to pad its images to 62, which the autoencoder (f = 4) cannot take: the fix is in the images' sizes
    (pad_to = 64, a multiple of 2 x 4) and names the patch field."""
    from ddmkit.pipeline.stages import check_networks
    cfg = validate(RunConfig, {"latent": {"enabled": True}, "expert": {"net": {"arch": "dit", "kwargs": {
        "patch": 2, "width": 32, "depth": 1, "heads": 2}}}, "router": {"net": {"arch": "router_cnn"}}})
    with pytest.raises(DDMError, match=r"^expert.net: DiT: latent size 15x15 \(of 60x60 images, 4x smaller per side\) "
                                       r"does not split into patches of 2x2; set expert.net.kwargs.patch = 1 \(the "
                                       r"largest that divides both sides\), or pad the images to 64x64 \(data.params."
                                       r"pad_to = 64, the smallest that works\), or scale and cut them to 56x56"):
        check_networks(cfg, (4, 15, 15))
    check_networks(cfg, (4, 64 // 4, 64 // 4))  # the pad_to it names fits
    check_networks(cfg.model_copy(update={"expert": cfg.expert.model_copy(update={"net": cfg.expert.net.model_copy(
        update={"kwargs": {**cfg.expert.net.kwargs, "patch": 1}})})}), (4, 15, 15))  # and so does the patch
    pixels = validate(RunConfig, {"expert": cfg.expert.model_dump(), "router": {"net": {"arch": "router_cnn"}}})
    with pytest.raises(DDMError, match=r"^expert.net: DiT: image size 29x29 does not split into patches of 2x2; set "
                                       r"expert.net.kwargs.patch = 1 .*, or pad the images to 30x30 \(data.params."
                                       r"pad_to = 30, "):
        check_networks(pixels, (1, 29, 29))


def test_train_expert_gives_a_latent_shards_fix_in_the_images_sizes(tmp_path):
    """`ddmkit train-expert RUN/latents/cluster_01.safetensors --set ...` with a UNet of too many levels for 8x8
    latents said 'UNet: image size 8x8 ... pad the images to 16x16 (data.params.pad_to = 16)', which would make
    4x4 latents; a DiT's patch, 'pad the data to a multiple of 3'. It now names the images' sizes (f = 4), as a
    run does; where the autoencoder folder is not on the machine, the network's own check is left to say it."""
    from safetensors.torch import save_file

    from ddmkit.pipeline.stages import check_expert_fits
    shard = tmp_path / "cluster_01.safetensors"
    save_file({"x": torch.zeros(3, 4, 8, 8), "labels": torch.zeros(3, dtype=torch.long)}, str(shard))
    unet = {"arch": "unet", "kwargs": {"channels": [8, 16, 16, 16, 16]}}
    dit = {"arch": "dit", "kwargs": {"patch": 3, "width": 16, "depth": 1, "heads": 2}}
    for net, said in ((unet, r"UNet: latent size 8x8 \(of 32x32 images, 4x smaller per side\) is not divisible by "
                             r"2\^4 .*data.params.pad_to = 64, "),
                      (dit, r"DiT: latent size 8x8 \(of 32x32 images, 4x smaller per side\) does not split into "
                            r"patches of 3x3; set expert.net.kwargs.patch = 2 .*data.params.pad_to = 36, ")):
        cfg = validate(RunConfig, {"latent": {"enabled": True}, "expert": {"net": net}})
        with pytest.raises(DDMError, match=f"^expert.net: {said}"):
            check_expert_fits(cfg, shard)
        away = validate(RunConfig, {"latent": {"enabled": True, "pretrained": str(tmp_path / "gone")},
                                    "expert": {"net": net}})
        check_expert_fits(away, shard)  # the autoencoder's downsampling unknown here: no fix named from it
    check_expert_fits(validate(RunConfig, {"latent": {"enabled": True}, "expert": {"net": {**unet, "kwargs": {
        "channels": [8, 16, 16, 16]}}}}), shard)  # 8x8 latents halve three times
    meta = {"ddmkit": json.dumps({"cluster": 1, "k": 2, "pixel_shard_sha256": "0" * 64, "data_hash": "0" * 64})}
    save_file({"x": torch.zeros(3, 2, 8, 8), "labels": torch.zeros(3, dtype=torch.long)}, str(shard), meta)
    done = run_cli("train-expert", shard, "--config", latent_config(tmp_path), "--out", tmp_path / "e", "--set",
                   "expert.net.kwargs.channels=[8, 16, 16, 16, 16]")  # the command checks it before training
    assert isinstance(done.exception, DDMError) and "data.params.pad_to = 64, " in str(done.exception), done.output
    assert not (tmp_path / "e").exists()


def test_a_unet_that_does_not_fit_the_latents_gives_the_image_sizes_that_do():
    """28x28 images make 7x7 latents (f = 4), which a 3-level UNet cannot halve twice: the fix is in the images'
    sizes (pad_to = 32, a multiple of 4 x 4), not the latents' (8)."""
    from ddmkit.pipeline.stages import check_networks
    cfg = validate(RunConfig, {"latent": {"enabled": True}, "expert": {"net": {"arch": "unet", "kwargs": {
        "channels": [8, 16, 16]}}}, "router": {"net": {"arch": "router_cnn"}}})
    with pytest.raises(DDMError, match=r"expert.net: UNet: latent size 7x7 \(of 28x28 images, 4x smaller per side\) is "
                                       r"not divisible by 2\^2 .*; pad the images to 32x32 \(data.params.pad_to = 32, "
                                       r"the smallest that works\), or scale and cut them to 16x16"):
        check_networks(cfg, (4, 7, 7))
    check_networks(cfg, (4, 8, 8))


def test_a_shard_without_metadata_is_not_called_a_shard_of_images(tmp_path):
    """A latent shard re-saved without its metadata was called 'a shard of images' by train-expert on a latent
    config. It does not say which space it holds: the message says so and how to fix it; a shard whose metadata is
    an image shard's is still refused as one, and nothing is written."""
    from ddmkit.io import save_tensors

    config = ROOT / "configs" / "fashion_mnist_latent.toml"
    bare, pixels = tmp_path / "bare.safetensors", tmp_path / "pixels.safetensors"
    save_tensors(bare, {"x": torch.zeros(4, 4, 8, 8)})
    save_tensors(pixels, {"x": torch.zeros(4, 1, 32, 32)}, metadata={"cluster": 0, "k": 2, "data_hash": "0" * 64})
    done = run_cli("train-expert", bare, "--config", config, "--out", tmp_path / "e")
    said = " ".join(str(done.exception).split())
    assert done.exit_code == 1 and isinstance(done.exception, DDMError) and "shard of images" not in said, said
    assert f"{bare} has no ddmkit metadata, so it does not say whether it holds images or latents" in said, said
    assert "re-save it with the original file's metadata (its 'ddmkit' key)" in said and "remove RUN/latents, then " \
        "`ddmkit partition --config RUN/config.json --out RUN`" in said, said
    done = run_cli("train-expert", pixels, "--config", config, "--out", tmp_path / "e")
    assert f"{pixels} is a shard of images, but the config trains in latent space" in str(done.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.safetensors", "pixels.safetensors"]


def test_the_latents_scale_is_reported_and_a_far_one_gets_the_scaling_factor_that_fixes_it(tmp_path):
    """A pretrained autoencoder of scaling_factor 20 gave latents of std 5.75, and nothing said so; its
    latents_mean and latents_std were ignored without a word."""
    ae = tiny_autoencoder(seed=3)
    ae.register_to_config(scaling_factor=200.0, latents_mean=[0.0, 0.0], latents_std=[1.0, 1.0])
    ae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    config = latent_config(tmp_path, pretrained=tmp_path / "vae")
    done = run_cli("partition", "--config", config, "--out", tmp_path / "run")
    said = " ".join(done.output.split())
    z = torch.cat([load_tensors(p)["x"] for p in sorted((tmp_path / "run" / "latents").glob("cluster_*"))]).double()
    assert done.exit_code == 0 and f"their mean {float(z.mean()):.3g}, std {float(z.std(unbiased=False)):.3g}" in said
    fix = 200.0 / float(z.std(unbiased=False))
    assert f"the latents' std is {float(z.std(unbiased=False)):.3g}, far from 1" in said and \
        f"A scaling_factor of {fix:.4g} in {tmp_path / 'vae' / 'config.json'} (now 200)" in said, said
    assert "sets latents_mean and latents_std, which ddmkit does not apply" in said
    ae.register_to_config(scaling_factor=fix, latents_mean=None, latents_std=None)
    ae.save_pretrained(tmp_path / "fixed", safe_serialization=True)
    done = run_cli("partition", "--config", latent_config(tmp_path, pretrained=tmp_path / "fixed"), "--out",
                   tmp_path / "run2")
    said = " ".join(done.output.split())
    assert done.exit_code == 0 and ", std 1 " in f"{said} " and "far from 1" not in said, said


def test_a_copy_no_latents_were_encoded_with_follows_its_changed_source(tmp_path, monkeypatch):
    """A run stopped while it encoded kept its copy of the pretrained folder; a scaling_factor set there before
    the command was run again (what the latents' note asks for) was ignored without a word, and the note then
    named the folder's config.json as if it held the old value."""
    tiny_autoencoder(seed=3).save_pretrained(tmp_path / "vae", safe_serialization=True)
    config = latent_config(tmp_path, pretrained=tmp_path / "vae")

    def stop(self, x):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(LatentCodec, "encode", stop)
        assert run_cli("partition", "--config", config, "--out", tmp_path / "run").exit_code != 0
    assert (tmp_path / "run" / "autoencoder").is_dir() and not (tmp_path / "run" / "latents").exists()
    settings = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**settings, "scaling_factor": 2.5}))
    again = run_cli("partition", "--config", config, "--out", tmp_path / "run")
    said = " ".join(again.output.split())
    assert again.exit_code == 0 and "copied into" in said and "again (config.json changed" in said, said
    assert json.loads((tmp_path / "run" / "latents" / "latents.json").read_text())["scaling_factor"] == 2.5
    assert load_autoencoder(tmp_path / "run" / "autoencoder").config.scaling_factor == 2.5


def test_a_side_the_autoencoder_cannot_take_gets_the_padding_its_data_kind_takes(tmp_path, monkeypatch, capsys):
    """An array file of (N, C, H, W) images was told to set data.params.pad_to, which array files refuse (unknown
    keyword); the image_array loader reads the same file and pads it."""
    import numpy as np
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(-1, 1, (120, 1, 30, 30)).astype(np.float32))
    cfg = LatentConfig(enabled=True, channels=2, widths=[8, 8, 8])
    with pytest.raises(DDMError, match=r"e.g. set data.params.pad_to = 32 \(each image padded"):
        latent_shape(planned_config(cfg, (1, 30, 30)), (1, 30, 30), "image_folder")
    text = latent_config(tmp_path).read_text().replace('name = "fashion_mnist"', f'name = "{tmp_path / "x.npy"}"')
    text = text.replace(f'params = {{ dir = "{tmp_path / "fm"}", pad_to = 32 }}', "params = {}")
    text = text.replace(", num_classes = 10", "")
    (tmp_path / "array.toml").write_text(text)
    code, out = exit_code(monkeypatch, capsys, "partition", "--config", tmp_path / "array.toml", "--out",
                          tmp_path / "run")
    fix = f'set data.name = "image_array", data.params.path = "{tmp_path / "x.npy"}" and data.params.pad_to = 32'
    assert code == 2 and fix in out and not (tmp_path / "run").exists(), out
    code, out = exit_code(monkeypatch, capsys, "partition", "--config", tmp_path / "array.toml", "--out",
                          tmp_path / "run", "--set", "data.name=image_array", "--set",
                          f"data.params.path={tmp_path / 'x.npy'}", "--set", "data.params.pad_to=32")
    assert code == 0 and "latents: 2 shards encoded to shape (2, 8, 8)" in out, out


def test_an_array_file_with_key_or_test_path_gets_a_padding_that_keeps_them(tmp_path, monkeypatch, capsys):
    """The image_array fix dropped data.params.key and test_path, which image_array does not take (nor an array
    of another name, nor a test file): such a file is told to pad itself with a line of numpy, which works; a
    key that image_array picks itself, and test_fraction, keep the image_array fix."""
    import re

    import numpy as np
    rng = np.random.default_rng(0)
    for name, n in (("train", 120), ("test", 40)):
        np.savez(tmp_path / f"{name}.npz", labels=np.zeros(n, dtype=np.int64),
                 pixels=rng.uniform(-1, 1, (n, 1, 30, 30)).astype(np.float32))
    text = latent_config(tmp_path).read_text().replace('name = "fashion_mnist"', f'name = "{tmp_path / "train.npz"}"')
    text = text.replace(f'params = {{ dir = "{tmp_path / "fm"}", pad_to = 32 }}',
                        f'params = {{ key = "pixels", test_path = "{tmp_path / "test.npz"}" }}')
    (tmp_path / "array.toml").write_text(text.replace(", num_classes = 10", ""))
    code, out = exit_code(monkeypatch, capsys, "partition", "--config", tmp_path / "array.toml", "--out",
                          tmp_path / "run")
    assert code == 2 and "image_array" in out and "data.params.pad_to" not in out, out
    assert "takes no data.params.key or data.params.test_path" in out and not (tmp_path / "run").exists(), out
    snippet = re.search(r"in Python: (.*?); then set", out).group(1)
    exec(snippet)  # the files padded as pad_to pads: black borders, the labels kept
    padded = np.load(tmp_path / "train_32.npz")
    assert padded["pixels"].shape == (120, 1, 32, 32) and (padded["pixels"][:, :, 0] == -1).all()
    assert (padded["labels"] == 0).all() and np.array_equal(padded["pixels"][:, :, 1:-1, 1:-1],
                                                             np.load(tmp_path / "train.npz")["pixels"])
    fix = f'then set data.name = "{tmp_path / "train_32.npz"}" and data.params.test_path = "{tmp_path / "test_32.npz"}"'
    assert fix in out, out
    code, out = exit_code(monkeypatch, capsys, "partition", "--config", tmp_path / "array.toml", "--out",
                          tmp_path / "run", "--set", f"data.name={tmp_path / 'train_32.npz'}", "--set",
                          f"data.params.test_path={tmp_path / 'test_32.npz'}")
    assert code == 0 and "120 train / 40 test" in out and "latents: 2 shards encoded to shape (2, 8, 8)" in out, out
    # no test_path, and a key image_array reads anyway: the image_array fix, test_fraction kept
    cfg = planned_config(LatentConfig(enabled=True, channels=2, widths=[8, 8, 8]), (1, 30, 30))
    with pytest.raises(DDMError, match=rf'data.name = "image_array", data.params.path = "{tmp_path / "train.npz"}", '
                                       r"data.params.test_fraction = 0.25 and data.params.pad_to = 32 \(it reads "
                                       r"the array 'pixels' without data.params.key"):
        latent_shape(cfg, (1, 30, 30), str(tmp_path / "train.npz"), {"key": "pixels", "test_fraction": 0.25})
    np.savez(tmp_path / "two.npz", x=np.zeros((4, 1, 30, 30), np.float32), pixels=np.zeros((4, 1, 30, 30), np.float32))
    with pytest.raises(DDMError, match=r"takes no data.params.key:") as info:  # image_array would read 'x'
        latent_shape(cfg, (1, 30, 30), str(tmp_path / "two.npz"), {"key": "pixels"})
    assert "f['pixels'] = np.pad(f['pixels'], w, constant_values=-1)" in str(info.value)


def test_a_damaged_pretrained_folder_is_named_with_the_fix(tmp_path):
    """A config.json cut short (an interrupted copy) was to be 're-created with the ddmkit command that wrote it',
    which no ddmkit command did; cut weights were named without a fix."""
    tiny_autoencoder().save_pretrained(tmp_path / "vae", safe_serialization=True)
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(DDMError, match=r"could not be loaded as an AutoencoderKL .*; copy the folder again, whole"):
        load_autoencoder(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL",')
    with pytest.raises(DDMError, match=r"config.json is not valid JSON .*; latent.pretrained names this folder: copy "
                                       r"the folder again, whole .* AutoencoderKL.save_pretrained$"):
        load_autoencoder(tmp_path / "vae")


def test_a_bad_autoencoder_is_named_as_the_folder_given_the_config_field_or_the_runs_copy(tmp_path):
    """load_autoencoder's messages began 'latent:' whichever folder it read: the config's latent.pretrained
    folder (its check before a run, its copy into the run) or the run's own copy, RUN/autoencoder (encoding,
    sampling)."""
    from ddmkit.latent import load_codec
    from ddmkit.latent.autoencoder import check_pretrained

    ae = tiny_autoencoder()
    with torch.no_grad():
        ae.decoder.conv_out.bias.fill_(float("nan"))
    ae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    nan = r" holds NaN or infinite weights \(first: decoder.conv_out.bias\)"
    with pytest.raises(DDMError, match=rf"^latent.pretrained: {tmp_path / 'vae'}{nan}"):
        check_pretrained(LatentConfig(enabled=True, pretrained=str(tmp_path / "vae")))
    with pytest.raises(DDMError, match=rf"^latent.pretrained: {tmp_path / 'vae'}{nan}"):
        load_autoencoder(tmp_path / "vae")
    with pytest.raises(DDMError, match=rf"^RUN/autoencoder: {tmp_path / 'vae'}{nan}"):
        load_codec(tmp_path / "vae", 1)  # what encoding and sampling load: the run's copy


def test_a_model_hub_id_is_told_that_nothing_is_downloaded_and_how_to_save_the_folder(tmp_path, monkeypatch):
    """'stabilityai/sd-vae-ft-mse' was only 'not a folder', and a relative path was not told where it was looked for."""
    from ddmkit.latent.autoencoder import folder_config
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DDMError, match=r"^latent.pretrained: folder 'stabilityai/sd-vae-ft-mse' \(resolved to "
                                       rf"{re.escape(str(tmp_path))}/stabilityai/sd-vae-ft-mse\) does not exist; .*"
                                       r"cannot download from a model hub; if 'stabilityai/sd-vae-ft-mse' is a model "
                                       r"hub id: .*AutoencoderKL.from_pretrained\('stabilityai/sd-vae-ft-mse'\)"
                                       r".save_pretrained\('FOLDER'\)"):
        folder_config("stabilityai/sd-vae-ft-mse")
    (tmp_path / "models").mkdir()
    with pytest.raises(DDMError, match=r"relative to the folder ddmkit runs in") as info:
        folder_config("models/vae")  # its parent is here: not a hub id
    assert "hub id" not in str(info.value)


@pytest.mark.parametrize("given", ["./models/vae", "models/vae", "models/vae/", "../elsewhere/vae", "my vae/v1"])
def test_a_missing_relative_pretrained_folder_is_one_line_naming_it_as_given_and_resolved(tmp_path, monkeypatch,
                                                                                       given):
    """latent.pretrained = "./models/vae" (no such folder) was a long message naming 'models/vae', which added "if
    'models/vae' is a model hub id: ...": a path written as one. It is one line: the path as given, where it was
    looked for, the fix; a hub id's hint only for what reads as 'owner/name'."""
    from ddmkit.latent.autoencoder import folder_config
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DDMError) as info:
        folder_config(given)
    said = str(info.value)
    assert said.startswith(f"latent.pretrained: folder {given!r} (resolved to {(tmp_path / given).resolve()}) does "
                           "not exist; give the folder AutoencoderKL.save_pretrained wrote"), said
    assert "cannot download from a model hub" in said and "\n" not in said and "hub id" not in said, said


@pytest.mark.parametrize("name, value, said", [
    ("scaling_factor", 0, "scaling_factor = 0 is not a number > 0"),
    ("scaling_factor", None, "scaling_factor = null is not a number > 0"),
    ("scaling_factor", "0.18", 'scaling_factor = "0.18" is not a number > 0'),
    ("scaling_factor", -1.0, "scaling_factor = -1.0 is not a number > 0"),
    ("shift_factor", float("nan"), "shift_factor = NaN is not a finite number"),
])
def test_a_scaling_factor_that_cannot_scale_is_refused_before_the_run_writes(tmp_path, monkeypatch, capsys, name,
                                                                             value, said):
    """scaling_factor 0 or null in a pretrained folder's config.json crashed with a traceback after the data and
    partition were written (ZeroDivisionError, TypeError); "0.18" or a NaN shift encoded the latents, then every
    later stage refused the run's own copy as 'changed'."""
    tiny_autoencoder().save_pretrained(tmp_path / "vae", safe_serialization=True)
    settings = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**settings, name: value}))
    code, out = exit_code(monkeypatch, capsys, "run", latent_config(tmp_path, pretrained=tmp_path / "vae"), "--out",
                          tmp_path / "run")
    assert code == 2 and f"latent.pretrained: {tmp_path / 'vae' / 'config.json'}: {said}" in out, out
    assert "set it there to a" in out and "Traceback" not in out and not (tmp_path / "run").exists(), out
    settings.pop("scaling_factor")  # left out: diffusers' default, which the message offers
    (tmp_path / "vae" / "config.json").write_text(json.dumps(settings))
    assert load_autoencoder(tmp_path / "vae").config.scaling_factor == 0.18215


def test_a_file_given_for_the_folder_is_named_a_file_with_its_folder(tmp_path, monkeypatch, capsys):
    """latent.pretrained = ".../config.json" (or the weights file) was 'not a folder; give a local ... folder',
    without saying that the folder holding it is the one to give."""
    tiny_autoencoder().save_pretrained(tmp_path / "vae", safe_serialization=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        config = latent_config(tmp_path, pretrained=tmp_path / "vae" / name)
        code, out = exit_code(monkeypatch, capsys, "run", config, "--out", tmp_path / "run")
        assert code == 2 and f"{tmp_path / 'vae' / name} is a file, not a diffusers AutoencoderKL folder" in out, out
        assert f'set latent.pretrained = "{tmp_path / "vae"}", the folder that holds it' in out, out
        assert not (tmp_path / "run").exists()
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(DDMError, match=r"x.npz is a file, not a diffusers AutoencoderKL folder .*; give the folder "
                                       r"of one$"):
        load_autoencoder(tmp_path / "x.npz")


def test_a_folder_without_weights_is_told_to_copy_them_not_to_convert_them(tmp_path):
    """A folder holding config.json alone (the weights not copied) was told to 'convert the weights with
    AutoencoderKL.save_pretrained': there are none to convert. A folder of pickled weights is still told to."""
    ae = tiny_autoencoder()
    ae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(DDMError, match=r"vae holds a config.json but no weights \(diffusion_pytorch_model.safetensors\)"
                                       r"; copy the folder again, whole") as info:
        load_autoencoder(tmp_path / "vae")
    assert "convert" not in str(info.value)
    ae.save_pretrained(tmp_path / "vae", safe_serialization=False)
    with pytest.raises(DDMError, match=r"never pickled .bin files\): convert the weights"):
        load_autoencoder(tmp_path / "vae")


@pytest.mark.parametrize("value", [0.0, 0.37, -12.5])
@pytest.mark.parametrize("pretrained", [None, "models/vae"])
def test_constant_latents_are_said_to_be_constant_not_given_an_infinite_scaling_factor(value, pretrained):
    """Latents of one value (an autoencoder that encodes every image alike) have std 0, or rounding's few digits:
    latent_scale_notes divided the scaling_factor by it (ZeroDivisionError, or a scaling_factor of 1e8)."""
    from types import SimpleNamespace

    from ddmkit.config import RunConfig
    from ddmkit.pipeline.stages import latent_moments, latent_scale_notes, mean_std

    mean, std = mean_std(latent_moments(torch.full((6, 4, 8, 8), value)) + latent_moments(torch.full((3, 4, 8, 8),
                                                                                                      value)))
    cfg = RunConfig.model_validate({"latent": {"enabled": True, "pretrained": pretrained}})
    codec = SimpleNamespace(scale=0.18215, model=SimpleNamespace(config={}))
    notes = latent_scale_notes(cfg, codec, mean, std)
    assert len(notes) == 1 and notes[0].startswith("the latents are constant (mean "), notes
    assert "scaling_factor of" not in notes[0] and not re.search(r"\binf\b|\bnan\b|e\+0[5-9]|e\+[1-9]\d", notes[0])
    assert ("leave latent.pretrained out" in notes[0]) == (pretrained is not None)
    varied = torch.randn(6, 4, 8, 8) * 10 + value
    mean, std = mean_std(latent_moments(varied))
    assert "scaling_factor of" in latent_scale_notes(cfg, codec, mean, std)[0]  # std about 10: the usual note


def test_a_far_scale_of_another_runs_autoencoder_is_to_be_set_in_a_copy(tmp_path):
    """The note's fix for a far latent std, "set the scaling_factor in PRETRAINED/config.json", broke the run
    whose autoencoder PRETRAINED was (RUN/autoencoder, as the add-expert message suggests): that run refuses its
    autoencoder rescaled. For a folder inside a run the note says to set it in a copy; for others, as before."""
    from types import SimpleNamespace

    from ddmkit.config import RunConfig
    from ddmkit.pipeline.stages import latent_scale_notes

    run = tmp_path / "run"
    (run / "partition").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "autoencoder").mkdir()
    codec = SimpleNamespace(scale=0.18215, model=SimpleNamespace(config={}))
    for pretrained, copy in ((run / "autoencoder", True), (tmp_path / "vae", False)):
        cfg = RunConfig.model_validate({"latent": {"enabled": True, "pretrained": str(pretrained)}})
        note = " ".join(latent_scale_notes(cfg, codec, 0.0, 0.07)[0].split())
        assert "A scaling_factor of 2.602 in" in note, note
        assert (f"set it in a copy of {pretrained} (not in place: the run {run} encoded" in note) == copy, note
        assert note.endswith("make the run again in a new folder"), note
