"""Fine-tuning orchestration: zeroth-order tuning through a hardware backend, recalibration,
and publishing the tuned version.

`spec` is what a job is asked and what it reports (`FinetuneSpec`, `ProgressEvent`,
`FinetuneResult`); `job` runs it (`run_finetune`), in the job workers (`service.jobs.worker`);
`forward` measures a model's loss through a backend, the chip in the loop included. The
estimator math itself (perturbations, updates, replay) needs nothing but torch and lives in
`models.zo` and `models.trajectory`.
"""
