"""Optional dependencies, imported on first use with an error that names the extra to install.

The core (selection, sketches, the DeepSpeed engine, the pool reader) needs only what
``pip install ds_partitionsel`` brings. The rest is optional::

    mpi       mpi4py                        tools/build_pool.py under mpiexec
    plots     matplotlib                    tools/analyze_run.py, tools/experiment.py, tools/evidence.py
    lora      peft                          LoRA adapters (launch/train.py --lora)
    megatron  megatron-core                 Megatron indexed datasets as pool sources; TP sketches + launch/train_megatron.py
    demo      gguf, accelerate              tools/fetch_demo_data.py (the SmolLM2 GGUF file)
    torchtitan torchtitan                   ds_partitionsel.titan (the torchtitan data loader)
"""
import importlib

__all__ = ["EXTRAS", "require"]

# import name -> (extra, pip distribution)
EXTRAS = {
    "mpi4py": ("mpi", "mpi4py"),
    "matplotlib": ("plots", "matplotlib"),
    "peft": ("lora", "peft"),
    "megatron": ("megatron", "megatron-core"),
    "gguf": ("demo", "gguf"),
    "accelerate": ("demo", "accelerate"),
    "torchtitan": ("torchtitan", "torchtitan"),
}


def require(module: str, purpose: str):
    """Import ``module`` (dotted names allowed), or raise ImportError naming the extra.

    purpose : what needs it, e.g. ``"plots of a run"``; it starts the error message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra, dist = EXTRAS.get(top, (None, top))
        how = (f"pip install 'ds_partitionsel[{extra}]' (or pip install {dist})" if extra
               else f"pip install {dist}")
        raise ImportError(f"{purpose} needs the optional package {dist!r}, which is not "
                          f"installed ({exc}); install it with: {how}") from exc
