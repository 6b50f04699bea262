"""Protocol budgets shared by every method's presets, so methods differ only in their own settings.

A method registers its presets as ``{**QUICK_PROTOCOL, "method.g_steps": ...}``. The
``paper`` presets follow each paper's published CIFAR settings instead (methods.md).
"""

# A few minutes on a 2-core CPU (WRN-16-2 -> WRN-16-1, Fashion-MNIST): a smoke-sized comparison.
QUICK_PROTOCOL = {
    "epochs": 5, "ep_steps": 100, "kd_steps": 50, "batch_size": 128, "synth_batch_size": 64,
    "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "temperature": 20.0,
}

# At most ~30 minutes per method on a 2-core CPU: 20 rounds of 128 images, 2000 student steps.
CPU_PROTOCOL = {
    "epochs": 10, "ep_steps": 200, "kd_steps": 100, "batch_size": 128, "synth_batch_size": 128,
    "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "temperature": 20.0,
}

# The online methods' (DAFL, DFAD, DFQ, ZSKT) share of the protocol: a new generator batch of 128 for every
# student step, used as the generator made it (no crop/flip), one generator step per round. Each method adds
# its own round length (kd_steps) and student temperature from its authors' code.
ONLINE_PROTOCOL = {"synth_batch_size": 128, "kd_augment": False, "method.g_steps": 1}

