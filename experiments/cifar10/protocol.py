"""The CIFAR-10 protocol of docs/results_cifar10.md: paired seeds, every arm and control, one JSON result per run.

    python experiments/cifar10/protocol.py                  # run what is missing, 2 runs at a time
    python experiments/cifar10/protocol.py --dry-run        # print the plan (done / to do) and the commands
    python experiments/cifar10/protocol.py --commit         # also git-commit each result file as it arrives

Safe to stop at any point (Ctrl-C, SIGTERM, a lost machine): a run with a result file in
``experiments/cifar10/results/`` is never run again; an interrupted run resumes from its last checkpoint under
``--out`` (``--resume auto``), or starts again from step 0 where that directory is gone (a new machine); its
result is the same protocol either way. The summary (``summarize.py``) reads the result files only.

The protocol (``PROTOCOL``, fixed; its digest is in every result, and results of another digest are refused):

* data: CIFAR-10, a class-balanced subset of the train split (the first ``per_class`` images of each class, in
  file-name order), the full 10,000-image test split for every evaluation; 32 px, pad-4 crop + flip, in memory;
* recipe ``cifar10`` for every run, which differs only in the overrides of its arm and ``run.seed``; the seed
  fixes the data order, the augmentation and the student's initialisation, the same for every arm (the student is
  built first, from the seed, in every method), so arms are compared seed by seed;
* the static teacher (``cifar_resnet18``, recipe ``cifar10_teacher``, seed 0) is trained once and kept as a
  committed file (``artifacts/teacher.safetensors``), so that a later session distils from the same teacher;
  likewise each seed's CE student (the fine-tuning start point of arm (c));
* precision: bf16 autocast on a CPU with native bf16 (``results/``), float32 on one without
  (``results_fp32/``, ``_fp32`` artifacts and run directories): a comparison pairs runs of one precision only.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ARTIFACTS = HERE / "artifacts"
TEACHER = ARTIFACTS / "teacher.safetensors"

PROTOCOL = {
    "version": 2,
    "per_class": 1000,  # train images per class (10,000 in all)
    "epochs": 20,
    "finetune_epochs": 5,  # arm (c): from the seed's CE student, lr x 0.1 (the recipe's finetune_lr_scale)
    "teacher_epochs": 30,
    "eval_every_epochs": 3,
    "seeds": [1, 2, 3, 4, 5],
    "ds_config": "ds_configs/zero0.json",  # one process per run; bf16 autocast on a CPU with native bf16
}


# what the static teacher depends on: its digest alone checks the teacher's result (students check the whole)
TEACHER_KEYS = ("per_class", "teacher_epochs", "eval_every_epochs", "ds_config")


def protocol_digest(teacher: bool = False) -> str:
    fields = {k: PROTOCOL[k] for k in TEACHER_KEYS} if teacher else PROTOCOL
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    scenario: str  # a: static teacher, b: from scratch, c: fine-tuning, teacher
    label: str
    overrides: tuple[str, ...]
    needs: tuple[str, ...] = ()  # arms of the same seed that must have finished first
    epochs: int | None = None  # the arm's own schedule length (the cosine stretched over it); None: the protocol's

    def schedule(self) -> int:
        """Epochs this arm trains."""
        if self.epochs is not None:
            return self.epochs
        return PROTOCOL["finetune_epochs"] if self.scenario == "c" else PROTOCOL["epochs"]


_TEACHER = (f"model.static_teacher_checkpoint={TEACHER.relative_to(REPO)}",)
_NO_TEACHER = ("model.static_teacher=none", "loss.kd=none")
_FINETUNE = ("model.method={method}", *_NO_TEACHER, "model.student_checkpoint={ce_student}",
             f"optim.epochs={PROTOCOL['finetune_epochs']}")

ARMS = (
    Arm("a_ce", "a", "student CE only", ("model.method=plain", *_NO_TEACHER)),
    Arm("a_kd", "a", "KD", ("model.method=plain", "loss.kd=kl", *_TEACHER)),
    Arm("a_dkd", "a", "DKD", ("model.method=plain", "loss.kd=dkd", *_TEACHER)),
    Arm("a_kd_gpd", "a", "KD + GPD", ("model.method=gpd", "loss.kd=kl", *_TEACHER)),
    Arm("a_dkd_gpd", "a", "DKD + GPD", ("model.method=gpd", "loss.kd=dkd", *_TEACHER)),
    Arm("b_gpd", "b", "GPD from scratch", ("model.method=gpd", *_NO_TEACHER)),
    Arm("c_plain", "c", "plain fine-tuning", tuple(o.replace("{method}", "plain") for o in _FINETUNE), ("a_ce",)),
    Arm("c_gpd", "c", "GPD fine-tuning", tuple(o.replace("{method}", "gpd") for o in _FINETUNE), ("a_ce",)),
    # the controls: why does GPD help?
    Arm("b_peer", "b", "online peer (same size, own weights)", ("model.method=peer", *_NO_TEACHER)),
    Arm("a_dkd_gpd_trainmode", "a", "DKD + GPD, static teacher in train mode",
        ("model.method=gpd", "loss.kd=dkd", *_TEACHER, "model.static_teacher_train_mode=true")),
    Arm("b_gpd_branches", "b", "GPD from scratch, multi-branch dynamic teacher",
        ("model.method=gpd", *_NO_TEACHER, "model.branches=true")),
    Arm("b_gpd_r4", "b", "GPD from scratch, r = 4", ("model.method=gpd", *_NO_TEACHER, "model.width_ratio=4")),
)

# Issue 34, fixed before its runs. (1) Equal compute: a GPD step costs what COST_RATIO plain steps of the same loss
# cost (--measure-cost 30, docs/results_cifar10.md: KD 819 vs KD + GPD 375 img/s = 2.18x, DKD 665 vs 293 = 2.27x),
# so KD and DKD trained 20 x that many epochs cost what their GPD arms cost at 20; KD + GPD at the long length too,
# so equal epochs and equal compute are both answered at 20 and 44 epochs. (2) A ViT student (VIT): timm's
# vit_tiny_patch16_224 shrunk for 32 px and this machine (patch 4: 8 x 8 tokens, width 96, 6 blocks of 3 heads,
# 0.7 M parameters, about the ResNet student's cost per image x 2.5), AdamW as ViTs are trained (lr 1e-3 at batch
# 128, wd 0.05 not on norms, biases, tokens), the same schedule and data; CE, KD, KD + GPD, GPD from scratch, with
# the same static teacher. (3) DIST and DIST + GPD (Huang et al. 2022, its defaults).
COST_RATIO = {"kl": 2.18, "dkd": 2.27}
LONG = {loss: round(PROTOCOL["epochs"] * ratio) for loss, ratio in COST_RATIO.items()}  # 44, 45
VIT = ("model.student=vit_tiny_patch16_224",
       'model.student_kwargs={"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}',
       "optim.optimizer=adamw", "optim.lr=0.001", "optim.lr_ref_batch=128", "optim.weight_decay=0.05",
       "optim.decay_norm_and_bias=false")

ARMS = (*ARMS,
        Arm("a_kd_long", "a", f"KD, {LONG['kl']} epochs (the cost of KD + GPD at 20)",
            ("model.method=plain", "loss.kd=kl", *_TEACHER), epochs=LONG["kl"]),
        Arm("a_dkd_long", "a", f"DKD, {LONG['dkd']} epochs (the cost of DKD + GPD at 20)",
            ("model.method=plain", "loss.kd=dkd", *_TEACHER), epochs=LONG["dkd"]),
        Arm("a_kd_gpd_long", "a", f"KD + GPD, {LONG['kl']} epochs", ("model.method=gpd", "loss.kd=kl", *_TEACHER),
            epochs=LONG["kl"]),
        Arm("a_dist", "a", "DIST", ("model.method=plain", "loss.kd=dist", *_TEACHER)),
        Arm("a_dist_gpd", "a", "DIST + GPD", ("model.method=gpd", "loss.kd=dist", *_TEACHER)),
        Arm("v_ce", "a", "ViT student, CE only", ("model.method=plain", *_NO_TEACHER, *VIT)),
        Arm("v_kd", "a", "ViT student, KD", ("model.method=plain", "loss.kd=kl", *_TEACHER, *VIT)),
        Arm("v_kd_gpd", "a", "ViT student, KD + GPD", ("model.method=gpd", "loss.kd=kl", *_TEACHER, *VIT)),
        Arm("v_gpd", "b", "ViT student, GPD from scratch", ("model.method=gpd", *_NO_TEACHER, *VIT)),
        )
TEACHER_ARM = Arm("teacher", "teacher", "static teacher cifar_resnet18, CE", ("model.method=plain",))


def host_precision() -> str:
    """What the protocol's ds_config (bf16 autocast) runs as on this CPU: "bf16" where it has native bfloat16,
    else "fp32" (gpd_ds.engine: emulated bf16 would be slower than fp32)."""
    from gpd_ds.engine import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "fp32"


# Runs of one precision are compared with runs of the same precision only: a host without native bf16 writes its
# results to results_fp32/ (and its CE students to artifacts/*_fp32.safetensors), the first 60 runs are bf16's.
SUFFIX = {"bf16": "", "fp32": "_fp32"}


def result_path(arm: Arm, seed: int, precision: str = "bf16") -> Path:
    """The static teacher is one (bf16) for every precision: a frozen input of every student run."""
    if arm is TEACHER_ARM:
        return RESULTS / "teacher.json"
    return HERE / f"results{SUFFIX[precision]}" / f"{arm.name}_s{seed}.json"


def ce_student(seed: int, precision: str = "bf16") -> Path:
    return ARTIFACTS / f"a_ce_s{seed}{SUFFIX[precision]}.safetensors"


# --measure-cost times the fine-tuning arms from a random student (the speed does not depend on the weights)
COST_STUDENT = REPO / "runs" / "cifar10_protocol" / "cost_student.safetensors"


def _random_student(path: Path) -> None:
    from safetensors.torch import save_file

    from gpd_ds.models import create_model

    save_file(create_model("cifar_resnet10", num_classes=10).state_dict(), str(path))


# --- data ---------------------------------------------------------------------------------------------------------

def prepare_data(tgz: Path, out: Path) -> Path:
    """Shards of the train subset and the test split under ``out/shards`` (made once)."""
    shards = out / "shards"
    info = shards / "_info.json"
    if info.is_file() and '"val"' in info.read_text():
        return shards
    if not tgz.is_file():
        sys.exit(f"--cifar-tgz {str(tgz)!r} is not a file: point it at cifar10-jpeg.tar.gz (../shared/data)")
    jpeg = out / "jpeg"
    if not (jpeg / "test").is_dir():
        with tarfile.open(tgz) as tar:
            tar.extractall(jpeg, filter="data")  # the "data" filter refuses links and paths out of jpeg/
    subset = jpeg / "train_subset"
    shutil.rmtree(subset, ignore_errors=True)
    for cls in sorted(p for p in (jpeg / "train").iterdir() if p.is_dir()):
        (subset / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.jpg"))[:PROTOCOL["per_class"]]:
            (subset / cls.name / f.name).symlink_to(f.resolve())
    for split, src in (("train", subset), ("val", jpeg / "test")):
        subprocess.run([sys.executable, "-m", "gpd_ds.cli", "make-shards", str(src), str(shards), "--split", split,
                        "--shard-size", "1000", "--prefix", "cifar10"], check=True, cwd=REPO)
    return shards


# --- one run --------------------------------------------------------------------------------------------------------

def command(arm: Arm, seed: int, shards: Path, run_dir: Path, port: int, precision: str = "bf16") -> list[str]:
    recipe = "cifar10_teacher" if arm is TEACHER_ARM else "cifar10"
    epochs = PROTOCOL["teacher_epochs"] if arm is TEACHER_ARM else arm.epochs or PROTOCOL["epochs"]
    sets = [f"data.root={shards}", f"run.seed={seed}", f"optim.epochs={epochs}",
            f"run.eval_every_epochs={PROTOCOL['eval_every_epochs']}", "track.wandb=disabled",
            *(o.replace("{ce_student}", str(ce_student(seed, precision))) for o in arm.overrides)]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
           "launch/train.py", "--deepspeed_config", PROTOCOL["ds_config"], "--recipe", recipe,
           "--run-dir", str(run_dir), "--resume", "auto"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def summarise_run(arm: Arm, seed: int, run_dir: Path, wall_s: float, threads: int) -> dict:
    """The result file's content, from the run's own record and metrics."""
    record = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    models = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("eval/") and k.endswith("/top1")
                     and k.split("/")[1] != "gap"})
    evals = [{"epoch": r["epoch"], "step": r["step"], **{m: r[f"eval/{m}/top1"] for m in models
                                                         if f"eval/{m}/top1" in r}}
             for r in rows if any(f"eval/{m}/top1" in r for m in models)]
    rates = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r]
    cfg = record["config"]
    return {
        "arm": arm.name, "scenario": arm.scenario, "label": arm.label, "seed": seed,
        "protocol": PROTOCOL, "protocol_digest": protocol_digest(arm is TEACHER_ARM), "overrides": list(arm.overrides),
        "config_digest": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16],
        "method": cfg["model"]["method"], "precision": record["ds_config"]["torch_autocast"],
        "evals": evals, "final": evals[-1] if evals else {},
        "wall_clock_s": round(wall_s, 1), "train_images_per_s": round(statistics.median(rates), 1) if rates else None,
        "threads": threads, "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "versions": record.get("versions"), "commit": _git("rev-parse", "--short", "HEAD").strip(),
    }


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout


_GIT_LOCK = threading.Lock()


def commit(paths: list[Path], message: str) -> None:
    """Commit only these files (other staged or unstaged work is left alone); retried while git is busy."""
    rel = [str(p.relative_to(REPO)) for p in paths]
    with _GIT_LOCK:
        for attempt in range(5):
            subprocess.run(["git", "add", "--", *rel], cwd=REPO, check=False)
            done = subprocess.run(["git", "commit", "-q", "-m", message, "--only", "--", *rel], cwd=REPO,
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return
            time.sleep(2 + 3 * attempt)  # most often another git command holds index.lock
        print(f"could not commit {rel}: {done.stderr.strip()} (the files are written; commit them by hand)",
              file=sys.stderr)


# --- the queue ------------------------------------------------------------------------------------------------------

class Protocol:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.children: set[subprocess.Popen] = set()
        self.stopping = False
        self.port = args.port
        self.lock = threading.Lock()
        self.precision = host_precision()

    def jobs(self) -> list[tuple[Arm, int]]:
        arms = [a for a in ARMS if not self.args.arms or a.name in self.args.arms]
        return [(a, s) for s in self.args.seeds for a in arms]  # seed-major: finished seeds are complete pairs

    def done(self, arm: Arm, seed: int) -> bool:
        path = result_path(arm, seed, self.precision)
        if not path.is_file():
            return False
        digest, expected = json.loads(path.read_text()).get("protocol_digest"), protocol_digest(arm is TEACHER_ARM)
        if digest != expected:
            sys.exit(f"{path} was made by protocol {digest}, this is {expected}: the protocol is fixed; "
                     "move the old results away (or restore PROTOCOL) before running")
        return True

    def ready(self, arm: Arm, seed: int) -> bool:
        if "a_ce" in arm.needs and not ce_student(seed, self.precision).is_file():
            return False
        return all(self.done(a, seed) for a in ARMS if a.name in arm.needs)

    def next_port(self) -> int:
        """A master port of its own for each launch (runs go on in parallel threads)."""
        with self.lock:
            self.port += 1
            return self.port

    def run(self, arm: Arm, seed: int, shards: Path) -> bool:
        name = "teacher" if arm is TEACHER_ARM else f"{arm.name}_s{seed}{SUFFIX[self.precision]}"
        run_dir = self.out / "runs" / name
        cmd = command(arm, seed, shards, run_dir, self.next_port(), self.precision)
        if self.args.dry_run:
            print("  " + " ".join(cmd))
            return True
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log_path = run_dir.parent / f"{run_dir.name}.log"
        threads = self.args.threads * (self.args.parallel if arm is TEACHER_ARM else 1)
        print(f"start  {run_dir.name} (log {log_path})", flush=True)
        start = time.time()
        with open(log_path, "a") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
            self.children.add(proc)
            rc = proc.wait()
            self.children.discard(proc)
        if rc != 0 or self.stopping:
            if not self.stopping:
                print(f"FAILED {run_dir.name}: exit {rc}, see {log_path}", file=sys.stderr, flush=True)
            return False
        result = summarise_run(arm, seed, run_dir, time.time() - start, threads)
        written = [result_path(arm, seed, self.precision)]
        _write_json(written[0], result)
        if arm is TEACHER_ARM:
            shutil.copy(run_dir / "export" / "student.safetensors", TEACHER)
            written.append(TEACHER)
        if arm.name == "a_ce":
            shutil.copy(run_dir / "export" / "student.safetensors", ce_student(seed, self.precision))
            written.append(ce_student(seed, self.precision))
        top1 = ", ".join(f"{k} {v:.2f}" for k, v in result["final"].items() if k not in ("epoch", "step"))
        print(f"done   {run_dir.name}: {top1} ({result['wall_clock_s'] / 60:.1f} min)", flush=True)
        if self.args.commit:
            commit(written, f"experiments/cifar10: result {written[0].stem}")
        return True

    def measure_cost(self, steps: int, shards: Path) -> int:
        """Time ``steps`` optimizer steps of every arm (seed 1, ``--parallel`` at a time, as the protocol runs them)
        and project the protocol's wall-clock: how the schedule was chosen to fit the budget."""
        runs = self.out / "cost"
        shutil.rmtree(runs, ignore_errors=True)
        arms = [a for a in ARMS if not self.args.arms or a.name in self.args.arms]
        rates: dict[str, float] = {}

        def probe(arm: Arm) -> None:
            run_dir = runs / arm.name
            port = self.next_port()
            short = ("--set", f"run.max_steps={steps}", "--set", "run.export_at_end=false", "--set",
                     "run.log_every_steps=5")
            cmd = [*command(arm, 1, shards, run_dir, port, self.precision), *short]
            cmd = [c.replace(str(ce_student(1, self.precision)), str(COST_STUDENT)) for c in cmd]
            env = {**os.environ, "OMP_NUM_THREADS": str(self.args.threads)}
            subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, check=True)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            measured = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r]
            rates[arm.name] = statistics.median(measured[1:])  # the first interval holds the start-up

        COST_STUDENT.parent.mkdir(parents=True, exist_ok=True)
        _random_student(COST_STUDENT)
        for i in range(0, len(arms), self.args.parallel):
            threads = [threading.Thread(target=probe, args=(a,)) for a in arms[i:i + self.args.parallel]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        images = 10 * PROTOCOL["per_class"]
        total = 0.0
        print(f"| arm | img/s ({self.args.threads} thread, {self.args.parallel} runs at once) | epochs | "
              "minutes per run |")
        print("|---|---:|---:|---:|")
        for arm in arms:
            minutes = arm.schedule() * images / rates[arm.name] / 60
            total += minutes
            print(f"| {arm.name} | {rates[arm.name]:.0f} | {arm.schedule()} | {minutes:.1f} |")
        hours = total * len(self.args.seeds) / self.args.parallel / 60
        print(f"projected: {hours:.2f} h of training for {len(self.args.seeds)} seeds, {self.args.parallel} at a time "
              "(evaluations and start-up not included)")
        return 0

    def stop(self, *_: object) -> None:
        """SIGINT/SIGTERM: stop the runs (each saves on SIGTERM), write nothing for them; re-run to go on."""
        self.stopping = True
        for proc in list(self.children):
            os.killpg(proc.pid, signal.SIGTERM)

    def main(self) -> int:
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)
        shards = self.out / "shards" if self.args.dry_run else prepare_data(self.args.cifar_tgz, self.out)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        if not self.done(TEACHER_ARM, 0):
            print(f"teacher: {'to do' if self.args.dry_run else 'training'}", flush=True)
            if not self.run(TEACHER_ARM, 0, shards) and not self.args.dry_run:
                return 1
        elif not TEACHER.is_file():
            sys.exit(f"{result_path(TEACHER_ARM, 0)} exists but {TEACHER} does not: restore it from git")
        if self.args.teacher_only:
            return 0
        if self.args.measure_cost:
            return self.measure_cost(self.args.measure_cost, shards)
        pending = [(a, s) for a, s in self.jobs() if not self.done(a, s)]
        print(f"{len(self.jobs()) - len(pending)} of {len(self.jobs())} runs done; {len(pending)} to do "
              f"({self.precision} on this CPU: results in {result_path(ARMS[0], 1, self.precision).parent})",
              flush=True)
        return self._drain(pending, shards)

    def _drain(self, pending: list[tuple[Arm, int]], shards: Path) -> int:
        failed: list[str] = []
        running: list[threading.Thread] = []

        def job_thread(arm: Arm, seed: int) -> None:
            if not self.run(arm, seed, shards) and not self.stopping:
                failed.append(f"{arm.name}_s{seed}")

        while (pending or running) and not self.stopping:
            running = [t for t in running if t.is_alive()]
            startable = [j for j in pending if self.args.dry_run or self.ready(*j)]
            while startable and len(running) < self.args.parallel:
                job = startable.pop(0)
                pending.remove(job)
                running.append(threading.Thread(target=job_thread, args=job, daemon=True))
                running[-1].start()
            if not running and pending and not startable:
                print(f"blocked: {len(pending)} runs wait for runs that failed", file=sys.stderr)
                break
            time.sleep(0.2 if self.args.dry_run else 2)
        for thread in running:
            thread.join()
        if failed:
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
        if self.stopping:
            print("stopped on request: the interrupted runs saved a checkpoint; run this again to go on", flush=True)
        return 1 if failed or self.stopping else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar-tgz", type=Path, default=REPO.parent / "shared/data/cifar10-jpeg.tar.gz")
    parser.add_argument("--out", type=Path, default=REPO / "runs/cifar10_protocol", help="run directories, shards")
    parser.add_argument("--seeds", type=int, nargs="+", default=PROTOCOL["seeds"])
    parser.add_argument("--arms", nargs="+", choices=[a.name for a in ARMS], help="only these arms")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (the teacher: x parallel)")
    parser.add_argument("--port", type=int, default=29700)
    parser.add_argument("--commit", action="store_true", help="git-commit each result file as it arrives")
    parser.add_argument("--measure-cost", type=int, metavar="STEPS",
                        help="time STEPS steps of every arm and project the protocol's hours; no result is written")
    parser.add_argument("--teacher-only", action="store_true", help="train the static teacher, then stop")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and commands, run nothing")
    args = parser.parse_args()
    return Protocol(args).main()


if __name__ == "__main__":
    sys.exit(main())
