"""The flags that several command lines share, checked: a list of depths, --device and --dtype, and FlagError, the
one-line error a bad flag ends in (a flag's mistake, not the data's or a checkpoint's)."""
import torch


class FlagError(Exception):  # a flag's value cannot work: the scripts print it as one line and exit
    pass


def parse_depths(text: str, n_layers: int, flag: str, increasing: bool = False) -> list[int]:
    """Comma-separated depths (layer counts) of a model of n_layers, each within 1..n_layers."""
    try:
        depths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FlagError(f"{flag} {text!r}: expected comma-separated layer counts such as 4,8")
    if not depths:
        raise FlagError(f"{flag} {text!r}: expected at least one layer count")
    for d in depths:
        if not 1 <= d <= n_layers:
            raise FlagError(f"{flag} {text}: depth {d} is outside 1..{n_layers} (the model has {n_layers} layers)")
    if increasing and any(x >= y for x, y in zip(depths, depths[1:])):
        raise FlagError(f"{flag} {text}: depths must be strictly increasing")
    return depths


def device_and_dtype(device: str, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype of the sampling scripts: bfloat16 on CUDA and float32 elsewhere unless --dtype says."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FlagError(f"--device {device}: not a device name (cpu, cuda, cuda:1, ...)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FlagError(f"--device {device}: CUDA is not available here")
    return dev, getattr(torch, dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
