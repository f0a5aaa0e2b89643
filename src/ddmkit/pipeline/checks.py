"""Checks of a whole run plan against its data, before any training: a run that cannot finish
fails at the data and partition stage, with a fix that works, not after its networks are trained.

    check_run_plan(cfg, n_train, n_test, data_shape, has_truth)   sizes, splits and sample counts
    too_few_samples(cfg, n_train)                 -> str  partition.k above the training samples: the fix that works
    check_labels(cfg, labels)                     class-conditional networks and guidance against the data's labels
    untrained_classes(cfg, labels)                -> warnings  classes the samples draw that no training row holds
    unused_attention(cfg, data_shape)             -> warnings  UNet attention_res sides that no level of it has
    few_test_images(cfg, n_test, data_shape)      -> warnings  an image test split too small for FID/KID to mean much
    check_clusters(cfg, counts, data_shape, orphans)  -> warnings  the partition's clusters
    check_devices(cfg)                            every train.device of the config, present here
    checked_device(name)                          -> torch.device  a --device value, present here
    named_device(name)                            -> str  a --device value for a stage that uses none
    available_memory(device)                      -> int | None  bytes free for new tensors there
    check_sample_memory(n, data_shape, what, fix) a set of n samples' noise and samples, held on the host, fit
    check_text_sample_memory(n, positions, what, fix)  a text run's n samples' byte probabilities, one step's, fit

What the later stages need (each need is where that stage would fail or would not honour a setting):

- vectors: every sample set is scored against held-out rows (ddmkit.evaluation.sets.evaluate_all):
  a set of n samples takes R = n // c disjoint test chunks of c = min(evaluate.chunk, n) rows, and the
  noise floor R more: held_out_rows(n, chunk) = 2 R c rows. The main sets are scored together at the
  smallest set's size; the missing-expert and statistics-only router studies at
  min(evaluate.study_n, sample.n). held_out_rows grows with n, so sample.n = largest_n(...) always fits.
- images: FID and KID compare every set with the test split's features; KID draws evaluate.kid_subset
  images of each, so kid_subset must be at most sample.n, sample.sweep_n (when those sets are drawn) and the
  test images; FID needs 2 images a set.
- sample.sweep_n: the extra sets take the first sweep_n of the sample.n noises, so at most sample.n.
- clusters: the statistics-only router needs 2 rows in every cluster (a covariance); the exact DDM of
  a Gaussian mixture needs every cluster to own a mixture component; a cluster with fewer rows than
  expert.train.batch_size trains on repeated rows (a warning: the run finishes).
"""
from __future__ import annotations

import inspect
import math
import os

import torch

from ddmkit.config import DEVICE_FIX, GIVEN_DEVICE_FIX, RunConfig, device_name, field_device, resolve_device
from ddmkit.data.images import is_image_shape
from ddmkit.errors import DDMError
from ddmkit.nets.unet import UNet
from ddmkit.pipeline.samplesets import planned_sets

FILE_TEST_ROWS = ("data.params.test_fraction for a file, image folder or image array; data.params.test_path for a "
                  ".npy/.npz file")


def more_test_rows(cfg: RunConfig, n_test: int) -> str:
    """The settings that give the test split more rows: data.n_test only where it is what caps the split (not
    with n_test = 0, all of a file's test split, nor above the split's size)."""
    return f"data.n_test; {FILE_TEST_ROWS}" if cfg.data.n_test == n_test else FILE_TEST_ROWS


def held_out_rows(n: int, chunk: int) -> int:
    """Test rows a set of n samples is scored against: 2 R chunks of c = min(chunk, n), R = n // c."""
    if n < 1:
        return 0
    c = min(chunk, n)
    return 2 * (n // c) * c


def largest_n(n_test: int, chunk: int, upper: int) -> int:
    """The largest n <= upper with held_out_rows(n, chunk) <= n_test (0 when there is none)."""
    lo, hi = 0, upper
    while lo < hi:  # held_out_rows is non-decreasing in n: bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if held_out_rows(mid, chunk) <= n_test else (lo, mid - 1)
    return lo


def too_few_samples(cfg: RunConfig, n_train: int) -> str:
    """The message for partition.k above the n_train training samples the data gave: raising data.n_train is
    the fix only where it is what caps them; where the data set holds fewer rows (a small file), it adds none."""
    k, asked = cfg.partition.k, cfg.data.n_train
    said = f"partition.k = {k} is larger than the number of samples ({n_train}); "
    if n_train < asked:
        return (said + f"data set {cfg.data.name!r} holds {n_train} training rows, fewer than data.n_train = "
                f"{asked} asks for (raising it adds none): set partition.k = {n_train} or lower, or give the data "
                "set more rows")
    return said + f"set partition.k = {n_train} or lower, or raise data.n_train (it is {asked}) for more samples"


def check_run_plan(cfg: RunConfig, n_train: int, n_test: int, data_shape: tuple, has_truth: bool) -> None:
    """Every size, split and sample count of the config against the data's (n_train, n_test,
    data_shape, whether it has an exact truth); a DDMError naming the field and a fix that works."""
    if n_train < cfg.partition.k:
        raise DDMError(too_few_samples(cfg, n_train))
    s = cfg.sample
    sets = planned_sets(cfg, has_truth)
    extra = [p.n for p in sets if p.n != s.n]
    if s.sweep_n is not None and s.sweep_n > s.n and (s.stats_router_strategies or s.guidance_sweep):
        raise DDMError(f"sample.sweep_n = {s.sweep_n} is larger than sample.n = {s.n} (the extra sets take the first "
                       f"sweep_n of the sample.n noises); set sample.sweep_n = {s.n} or lower")
    if (s.guidance_sweep or s.guidance != 1.0) and not cfg.expert.net.kwargs.get("num_classes"):
        field = "sample.guidance_sweep" if s.guidance_sweep else "sample.guidance"
        raise DDMError(f"{field}: classifier-free guidance needs class-conditional experts (expert.net.kwargs."
                       "num_classes); these are unconditional, so every scale would draw the same samples: set "
                       "sample.guidance_sweep = [] and sample.guidance = 1.0")
    if (s.guidance_sweep or s.guidance != 1.0) and cfg.expert.label_dropout == 0:
        field = "sample.guidance_sweep" if s.guidance_sweep else "sample.guidance"
        raise DDMError(f"{field}: classifier-free guidance mixes in each expert's velocity without a label, which "
                       "expert.label_dropout = 0 never trains (the 'no label' embedding keeps its random start): "
                       "set expert.label_dropout = 0.1 (the usual share), or sample.guidance_sweep = [] and "
                       "sample.guidance = 1.0")
    if is_image_shape(data_shape):
        _check_images(cfg, n_test, min(extra, default=s.n))
    else:
        _check_vectors(cfg, n_test, [p.n for p in sets])


def label_settings(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """The settings that need class labels, each as (field = value, the edit that drops it, its --set):
    class-conditional networks (net kwargs num_classes) and classifier-free guidance."""
    found = []
    for where, net in (("expert.net.kwargs", cfg.expert.net), ("router.net.kwargs", cfg.router.net)):
        if net.kwargs.get("num_classes"):
            found.append((f"{where}.num_classes = {net.kwargs['num_classes']}", "remove it",
                          f"{where}.num_classes=0"))
    s = cfg.sample
    if s.guidance_sweep:
        found.append((f"sample.guidance_sweep = {s.guidance_sweep}", "set []", "'sample.guidance_sweep=[]'"))
    if s.guidance != 1.0:
        found.append((f"sample.guidance = {s.guidance}", "set 1.0", "sample.guidance=1.0"))
    return found


def check_labels(cfg: RunConfig, labels: list[torch.Tensor | None]) -> None:
    """Class-conditional networks (net kwargs num_classes = C > 0) need every row of every split (labels:
    one tensor or None per split) labelled with a class index in 0 .. C - 1: index C is the networks'
    "no label" token (classifier-free guidance), and a larger one is out of their table. One error names
    every setting that must change, so that one edit fixes the run."""
    if any(lab is None for lab in labels):
        needs = label_settings(cfg)
        if needs:
            named = ", ".join(f"{field} ({edit})" for field, edit, _ in needs)
            sets = " ".join(f"--set {fix}" for _, _, fix in needs)
            raise DDMError(f"the data have no class labels, but these settings need them: {named}; change them "
                           f"all (on the command line: {sets}), or give the data labels (an image folder: one "
                           "sub-folder per class; an .npz: a 'labels' array)")
        return
    present = [lab for lab in labels if len(lab)]
    lo = min(int(lab.min()) for lab in present) if present else 0
    hi = max(int(lab.max()) for lab in present) if present else 0
    nets = (("expert.net.kwargs", cfg.expert.net), ("router.net.kwargs", cfg.router.net))
    short = [(where, int(net.kwargs["num_classes"])) for where, net in nets
             if net.kwargs.get("num_classes") and (lo < 0 or hi >= int(net.kwargs["num_classes"]))]
    if short:
        top = max(hi + 1, 1)
        named = " and ".join(f"{where}.num_classes = {classes}" for where, classes in short)
        sets = " ".join(f"--set {where}.num_classes={top}" for where, _ in short)
        raise DDMError(f"{named}, but the data's labels run {lo} .. {hi}; labels are class indices 0 .. "
                       f"num_classes - 1: set num_classes = {top} ({sets})"
                       + (" and make every label 0 or more" if lo < 0 else ""))


def untrained_classes(cfg: RunConfig, labels: torch.Tensor | None) -> list[str]:
    """A warning when class-conditional experts (expert.net.kwargs num_classes = C) have classes that no
    training row (labels) holds: the samples draw their labels uniformly from 0 .. C - 1
    (pipeline.sampling.sample_labels), so those samples are of classes no network trained on (a folder of
    3 classes with configs/fashion_mnist.toml's num_classes = 10: 7 samples in 10)."""
    classes = int(cfg.expert.net.kwargs.get("num_classes") or 0)
    if not classes or labels is None or not len(labels):
        return []
    missing = sorted(set(range(classes)) - set(labels.unique().tolist()))
    if not missing:
        return []
    top = int(labels.max()) + 1
    if missing == list(range(top, classes)):
        named = f"{top} .. {classes - 1}" if len(missing) > 1 else f"{top}"
        nets = " and router.net.kwargs" if cfg.router.net.kwargs.get("num_classes") else ""
        fix = f"set num_classes = {top} in expert.net.kwargs{nets}"
    else:
        named = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        fix = "give each class training rows"
    return [f"expert.net.kwargs.num_classes = {classes}, but no training row has label {named} (the data's labels "
            f"run 0 .. {top - 1}): the samples' labels are drawn uniformly from 0 .. {classes - 1}, so "
            f"{len(missing)} samples in {classes} are of classes no network trained on; {fix} (or keep it if data "
            "added later, with `ddmkit add-expert`, bring those classes)"]


def unused_attention(cfg: RunConfig, data_shape: tuple) -> list[str]:
    """A warning for the sides in a UNet expert's attention_res that none of its levels has (the image height,
    halved at each level of channels after the first): they add no self-attention, e.g. configs/fashion_mnist.toml's
    [8] on 48x48 images (levels 48, 24, 12)."""
    net = cfg.expert.net
    if net.arch != "unet" or len(data_shape) != 3:
        return []
    defaults = inspect.signature(UNet).parameters
    channels = list(net.kwargs.get("channels", defaults["channels"].default))
    attention = list(net.kwargs.get("attention_res", defaults["attention_res"].default))
    sides = [data_shape[1] // 2 ** i for i in range(len(channels))]
    unused = [side for side in attention if side not in sides]
    if not unused:
        return []
    given = "" if "attention_res" in net.kwargs else " (the default)"
    one = len(unused) == 1
    return [f"expert.net.kwargs.attention_res = {attention}{given}: no level of the UNet has side"
            f"{'' if one else 's'} {', '.join(map(str, unused))} (its levels for {data_shape[1]}x{data_shape[2]} "
            f"inputs with channels {channels}: {', '.join(map(str, sides))}), so {'it adds' if one else 'they add'} "
            f"no self-attention; set attention_res to sides of its levels, e.g. [{sides[-1]}], or [] for none"]


# Below this many test images FID and KID mostly measure their own noise: FID estimates a covariance of 2048
# features (Inception's), which N images give with rank at most N - 1 (under 5% of it below 100), and its bias
# grows as 1/N; KID draws at most N test images per subset (configs/fashion_mnist.toml draws 1000). A floor for
# "mostly noise", not a size above which the scores are sharp.
FEW_TEST_IMAGES = 100


def few_test_images(cfg: RunConfig, n_test: int, data_shape: tuple) -> list[str]:
    """A warning when an image run's test split, which every sample set's FID and KID are computed against,
    holds fewer than FEW_TEST_IMAGES images: the scores would be mostly noise."""
    if not is_image_shape(data_shape) or n_test >= FEW_TEST_IMAGES:
        return []
    return [f"the test split holds {n_test} images: FID and KID compare each sample set with them, and on fewer "
            f"than {FEW_TEST_IMAGES} images they are mostly noise (FID estimates a covariance of their features "
            "from them, 2048 x 2048 with Inception's), so differences between strategies mean little; give the test "
            f"split more images ({more_test_rows(cfg, n_test)})"]


def _check_images(cfg: RunConfig, n_test: int, smallest: int) -> None:
    s, e = cfg.sample, cfg.evaluate
    if n_test < 2:
        raise DDMError(f"FID and KID compare samples with the test split, which holds {n_test} images; give it at "
                       f"least 2 ({more_test_rows(cfg, n_test)})")
    if s.n < 2:
        raise DDMError(f"sample.n = {s.n}: FID and KID need at least 2 images per set; set sample.n = 2 or more")
    if smallest < 2:
        raise DDMError(f"sample.sweep_n = {smallest}: FID and KID need at least 2 images per set; set "
                       "sample.sweep_n = 2 or more")
    works = min(smallest, n_test)  # smallest <= sample.n
    if e.kid_subset > min(s.n, n_test):
        what = f"sample.n = {s.n}" if s.n <= n_test else f"the {n_test} test images"
        raise DDMError(f"evaluate.kid_subset = {e.kid_subset} is larger than {what}: KID draws kid_subset images "
                       f"of each set and of the test split; set evaluate.kid_subset = {works} or lower"
                       + ("" if s.n <= n_test else
                          f" (or give the test split more images: {more_test_rows(cfg, n_test)})"))
    if e.kid_subset > smallest:
        raise DDMError(f"evaluate.kid_subset = {e.kid_subset} is larger than sample.sweep_n = {smallest} (the "
                       "guidance-sweep and statistics-only router sets): KID draws kid_subset images of each set; "
                       f"set evaluate.kid_subset = {works} or lower, or sample.sweep_n = {e.kid_subset} or more")


def _check_vectors(cfg: RunConfig, n_test: int, sizes: list[int]) -> None:
    s, e = cfg.sample, cfg.evaluate
    if not sizes:
        raise DDMError("sample.strategies: no sample set to draw (the list is empty, or holds only 'monolith' with "
                       "monolith.enabled = false); name at least one strategy, e.g. strategies = [\"top-2\"]")
    needs = [(min(sizes), "the sample sets")]
    if e.missing_experts or e.stats_router:
        needs.append((min(e.study_n, s.n), "the missing-expert and statistics-only router studies"))
    n, what = max(needs, key=lambda item: held_out_rows(item[0], e.chunk))
    need = held_out_rows(n, e.chunk)
    if n_test >= need:
        return
    c = min(e.chunk, n)
    fix = largest_n(n_test, e.chunk, s.n)
    first = f"set sample.n = {fix} or lower, or " if fix >= 1 else ""
    raise DDMError(f"evaluation scores {what} ({n} samples each) against {need} held-out rows (2 x {n // c} sets of "
                   f"{c}, evaluate.chunk = {e.chunk}), but the test split holds {n_test}; {first}give the test "
                   f"split at least {need} rows ({more_test_rows(cfg, n_test)})")


def check_clusters(cfg: RunConfig, counts: list[int], data_shape: tuple, orphans: list[int] = ()) -> list[str]:
    """The partition's cluster sizes (and, for a Gaussian mixture, the clusters that own no mixture
    component) against what training and evaluation need: a DDMError for a run that cannot finish,
    warnings (returned) for one that finishes with a likely surprise."""
    k = len(counts)
    tiny = [c for c, n in enumerate(counts) if n < 2]
    fields = _statistics_router_fields(cfg, data_shape)
    if tiny and fields:
        raise DDMError(f"partition: clusters {tiny} hold fewer than 2 rows, but the statistics-only router needs each "
                       f"cluster's covariance (2 rows or more); lower partition.k (now {k}) or set "
                       f"{' and '.join(fields)}")
    if orphans:
        raise DDMError(f"partition: clusters {list(orphans)} own no component of the Gaussian mixture, so the exact "
                       f"DDM's samples (the report's exact rows) cannot be drawn; set partition.k = "
                       f"{k - len(orphans)} or lower (now {k}; at most the mixture's number of components)")
    batch = cfg.expert.train.batch_size
    small = [c for c, n in enumerate(counts) if n < batch]
    if small:
        return [f"clusters {small} hold fewer rows than expert.train.batch_size = {batch} (the smallest holds "
                f"{min(counts)}): their experts draw every batch with repeated rows; lower expert.train.batch_size or "
                "partition.k if that is not what you want"]
    return []


def _statistics_router_fields(cfg: RunConfig, data_shape: tuple) -> list[str]:
    """The settings that use the statistics-only router, each as the value that turns it off: the sets of
    sample.stats_router_strategies (any data) and, for vectors, the evaluate.stats_router study."""
    fields = ["sample.stats_router_strategies = []"] if cfg.sample.stats_router_strategies else []
    if cfg.evaluate.stats_router and not is_image_shape(data_shape):
        fields.append("evaluate.stats_router = false")
    return fields


def unused_partition_settings(cfg: RunConfig) -> list[str]:
    """Warnings for partition settings the chosen features ignore (pca_dim without features = 'pca',
    encoder_* without features = 'encoder'): set, they change nothing, which is likely not what was meant."""
    p = cfg.partition
    fields = {"pca": ["pca_dim"],
              "encoder": ["encoder_pool", "encoder_size", "encoder_batch", "encoder_normalize"]}
    warnings = []
    for features, names in fields.items():
        changed = [f"partition.{name} = {getattr(p, name)!r}" for name in names
                   if p.features != features and getattr(p, name) != type(p).model_fields[name].default]
        if changed:
            one = len(changed) == 1
            warnings.append(f"{', '.join(changed)} only {'applies' if one else 'apply'} with partition.features = "
                            f"{features!r} (it is {p.features!r}), so {'it changes' if one else 'they change'} "
                            f"nothing; set features = {features!r} or remove {'it' if one else 'them'}")
    return warnings


def check_devices(cfg: RunConfig, fix: str = DEVICE_FIX) -> None:
    """Every train.device of the networks a run trains is on this machine: a DDMError naming the field,
    ending with `fix` ('{}' in it: the field)."""
    sections = [("expert", cfg.expert.train), ("router", cfg.router.train)]
    if cfg.latent.enabled and cfg.latent.pretrained is None:
        sections.append(("latent", cfg.latent.train))
    for name, train in sections:
        field = f"{name}.train.device"
        field_device(field, train.device, fix.format(field))


def checked_device(name, from_run: bool = False) -> torch.device:
    """The device named by --device (from_run: by the run's expert.train.device): auto, cpu, cuda, cuda:N
    or mps, resolved as training resolves it (auto: cuda when there is one) and present on this machine."""
    if from_run:
        return resolve_device(str(name), f"--device: {str(name)!r} (the run's expert.train.device)")
    return resolve_device(str(name), f"--device: {str(name)!r}", GIVEN_DEVICE_FIX)  # no config's device applies


def named_device(name) -> str:
    """The device named by --device for a stage that computes nothing (a report from kept measurements):
    a device name (auto, cpu, cuda, cuda:N or mps), not necessarily one this machine has."""
    return device_name(name, f"--device: {str(name)!r}")


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`: a CUDA device's free memory (torch.cuda.mem_get_info); else this
    machine's available memory (psutil when installed, else /proc/meminfo's MemAvailable, which counts the page
    cache the kernel gives back, else os.sysconf's free pages); None when none of them can tell."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def size_text(nbytes: float) -> str:
    """nbytes in GiB (MiB below 1 GiB), e.g. '12.3 GiB'."""
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_sample_memory(n: int, data_shape, what: str = "sample.n",
                        fix: str = "set sample.n = {n} or less (--set sample.n={n})") -> None:
    """A DDMError opening with `what` (the setting or option that gave n) when a set's noise and samples alone
    (2 x n x the data's numbers, float32, held on the host) are more than this machine's available memory: the
    kernel would kill the command without a word. `fix` names the largest n that takes at most half of it
    ({n} in it); nothing is checked where the memory cannot be told."""
    _check_memory(n, 2 * 4 * math.prod(data_shape), f"{what} = {n}: its noise and samples alone",
                  f"2 x {n} x {'x'.join(map(str, data_shape))} float32 numbers", fix)


def check_text_sample_memory(n: int, positions: int, what: str = "sample.n",
                             fix: str = "set sample.n = {n} or less (--set sample.n={n})") -> None:
    """check_sample_memory for a text run, which samples its n sequences in one batch: a DDMError when the
    probabilities of a byte's 256 values at every one of the `positions` its networks read, for every sequence
    (8 bytes each: the experts' float32 log-probabilities stacked, or a routed mixture's float64, at least), are
    more than the available memory; one sampling step holds these and more (the networks' activations)."""
    _check_memory(n, 8 * 256 * positions, f"{what} = {n}: one sampling step's byte probabilities alone",
                  f"{n} x {positions} positions x 256 byte values, 8 bytes each", fix)


def _check_memory(n: int, per_row: int, held: str, numbers: str, fix: str) -> None:
    """A DDMError when n rows of per_row bytes each are more than the available memory: `held` (what the command
    would hold, opening with the option) takes that much; `numbers` says how it is counted, `fix` ({n} in it) the
    largest n that takes at most half of it."""
    free = available_memory(torch.device("cpu"))
    if free is None or n * per_row <= free:
        return
    fits = max(1, free // 2 // per_row)
    raise DDMError(f"{held} would take {size_text(n * per_row)} of memory ({numbers}), more than the "
                   f"{size_text(free)} available here; {fix.format(n=fits)} (half of it, the rest for the networks), "
                   "or sample where there is more memory")
