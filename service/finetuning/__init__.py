"""Fine-tuning orchestration: zeroth-order tuning through a hardware backend, recalibration,
and publishing the tuned version.

`job` is the fine-tuning job (`FinetuneSpec` -> `run_finetune` -> `FinetuneResult`), run by
the job workers (`service.jobs.worker`); `forward` measures a model's loss through a backend, the
chip in the loop included. The estimator math itself (perturbations, updates, replay) needs
nothing but torch and lives in `models.zo` and `models.trajectory`.
"""
