"""Accuracy loss against parameters pruned away, five lines (paper Figure 5).

  python -m lwc.experiments.tradeoff --model=lenet_300_100 \
      --flagfile=experiments/lenet_300_100.flags --data_dir=../shared/data/mnist --workdir=DIR \
      [--fractions=0.5,0.6,0.7,0.8,0.9,0.95,0.97] [--retrain_epochs=N] [--iterative_iterations=6]

Trains an L1- and an L2-regularised dense model (everything else from the flags), prunes each to
every fraction without and with retraining, and runs iterative pruning from the L2 model at
--quality / --layer_quality (`lwc.tradeoff`). Sub-runs live under --workdir; running the command
again reuses the finished ones. Writes tradeoff.csv, .json, .md and .png into --workdir.
--iterations is not used (see --iterative_iterations); L2 lines use --reg_strength and
--retrain_reg_strength, L1 lines --l1_reg_strength and --l1_retrain_reg_strength.
"""

from __future__ import annotations


from absl import app, flags

from lwc import errors, tradeoff
from lwc.experiments import common

FLAGS = flags.FLAGS

common.define_flags("lenet_300_100", ["lenet_300_100", "lenet5"])
flags.adopt_module_key_flags(common)
flags.DEFINE_list("fractions", [str(f) for f in tradeoff.DEFAULT_FRACTIONS],
                  "Fractions of every layer's weights pruned (lines 1-4), each in [0, 1).")
flags.DEFINE_integer("iterative_iterations", 6, "Prune + retrain rounds of the iterative line "
                     "(one point each); 0 leaves the line out.")
flags.DEFINE_float("l1_reg_strength", tradeoff.Strengths.l1, "L1 strength of the L1 lines' "
                   "dense training.")
flags.DEFINE_float("l1_retrain_reg_strength", tradeoff.Strengths.l1_retrain, "L1 strength of "
                   "the L1 lines' retraining.")


def main(argv) -> None:
  common.start(argv)

  def run():
    fractions = tradeoff.check_fractions(FLAGS.fractions)
    strengths = tradeoff.Strengths(l1=FLAGS.l1_reg_strength,
                                   l1_retrain=FLAGS.l1_retrain_reg_strength,
                                   l2=FLAGS.reg_strength, l2_retrain=FLAGS.retrain_reg_strength)
    return tradeoff.run(common.config_from_flags(), FLAGS.workdir, fractions,
                        FLAGS.iterative_iterations, strengths)

  result = common.run_or_exit(run)
  print(tradeoff.markdown(result), end="")
  reused = sum(result["subruns"].values())
  print(f"{len(result['subruns'])} sub-runs ({reused} reused) in {result['seconds']:.1f} s; "
        f"wrote {', '.join(result['paths'].values())}")


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags)
