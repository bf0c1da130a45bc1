"""How training is spread over processes: single device, DDP or FSDP, applied from outside the
model. Only this package calls torch.distributed."""

from gpt2cli.parallel.base import Strategy, resolve_device
from gpt2cli.parallel.distributed import DDPStrategy, FSDPStrategy, check_cpu_offload, make_strategy

__all__ = ["DDPStrategy", "FSDPStrategy", "Strategy", "check_cpu_offload", "make_strategy", "resolve_device"]
