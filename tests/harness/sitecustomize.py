"""Test-only answers to CUDA-only assumptions in Axolotl and accelerate, so DeepSpeed runs on a CPU machine.

Put this folder on PYTHONPATH of an `axolotl train` subprocess. Each patch is applied right after its
module is first imported (nothing is imported here up front) and only changes behaviour when CUDA is
absent. None of this is part of the package: on a GPU machine no patch is needed.
"""

import importlib.abc
import importlib.util
import os
import sys


def _patch_axolotl_environment(module) -> None:
    # Stands in for axolotl.utils.environment.check_cuda_p2p_support: with WORLD_SIZE > 1 it calls
    # torch.cuda.can_device_access_peer, which raises without CUDA. Peer-to-peer GPU access does not
    # exist on a CPU, so the answer there is False (Axolotl then only sets NCCL_P2P_DISABLE=1).
    original = module.check_cuda_p2p_support

    def check_cuda_p2p_support() -> bool:
        import torch

        return original() if torch.cuda.is_available() else False

    module.check_cuda_p2p_support = check_cuda_p2p_support


def _patch_axolotl_config(module) -> None:
    # Stands in for axolotl.utils.config.normalize_config: with WORLD_SIZE > 1 it sets
    # cfg.device_map = {"": LOCAL_RANK}, an integer, which transformers reads as a CUDA device, so loading
    # the model fails without CUDA ("Found no NVIDIA driver"). ZeRO-3 does not pass a device map, ZeRO-2
    # does. Without CUDA, choose_device (called just before) has picked "cpu": this keeps that answer.
    original = module.normalize_config

    def normalize_config(cfg):
        import torch

        original(cfg)
        if not torch.cuda.is_available() and cfg.device_map == {"": int(os.environ.get("LOCAL_RANK", "0"))}:
            cfg.device_map = {"": "cpu"}

    module.normalize_config = normalize_config


def _patch_accelerate_state(module) -> None:
    # Stands in for accelerate.state.PartialState._prepare_backend: under torchrun (LOCAL_RANK set) on a
    # machine without an accelerator it picks no backend unless cpu=True, and cpu=True skips the DeepSpeed
    # branch. With no backend accelerate reports num_processes = 1 while DeepSpeed runs a 2-process gloo
    # group, and DeepSpeed's batch check fails (train_batch_size 4 != 2 * 2 * 2). gloo is the backend
    # DeepSpeed's CPU accelerator uses, so it is the answer when nothing else was found.
    state = module.PartialState
    original = state._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        import torch

        backend, distributed_type = original(self, cpu, sagemaker_dp, backend)
        under_launcher = int(os.environ.get("LOCAL_RANK", "-1")) != -1
        if backend is None and not cpu and under_launcher and not torch.cuda.is_available():
            backend = "gloo"
        return backend, distributed_type

    state._prepare_backend = _prepare_backend


PATCHES = {
    "axolotl.utils.environment": _patch_axolotl_environment,
    "axolotl.utils.config": _patch_axolotl_config,
    "accelerate.state": _patch_accelerate_state,
}


class _PatchAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a patched module with the normal loader, then applies its patch."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._loaders = getattr(self, "_loaders", {}) | {name: spec.loader}
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module):
        self._loaders[module.__name__].exec_module(module)
        PATCHES[module.__name__](module)


sys.meta_path.insert(0, _PatchAfterImport())
