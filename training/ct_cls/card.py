"""models/ct-classifier/card.md, written from its metrics so numbers never drift."""

from __future__ import annotations

from pathlib import Path

from covid_plugin.ml.spec import CtClassifierSpec
from training.common.card_text import HU_SOURCES, INTENDED_USE, device_text, fmt, row


def write_cls_card(out: Path, spec: CtClassifierSpec, metrics: dict) -> None:
    rows = "\n".join(
        f"| {name} | {r['label']} | {r['slices']} | {r['chosen_without_it']['lesion_probability']}"
        f" / {r['chosen_without_it']['min_lesion_ml']} / {r['chosen_without_it']['decision']:.3f}"
        f" | {r['lesion_ml']:.1f} | {r['involvement_percent']:.2f} | "
        f"{r['right_percent']:.2f} / {r['left_percent']:.2f} | {r['peripheral_fraction']:.2f} | "
        f"{r['ggo_fraction']:.2f} | {r['score']:.3f} | {'COVID' if r['called_covid'] else 'not'} |"
        for name, r in metrics["per_patient"].items()
    )
    lopo, burden = metrics["lopo"], metrics["burden_only_auc"]

    def ci(block: dict) -> str:
        return "n/a" if block["ci95"] is None else f"{block['ci95'][0]:.2f}-{block['ci95'][1]:.2f}"

    def rate(block: dict, name: str) -> str:
        if block[name] is None:
            return "n/a"
        hits, n = block[f"{name}_counts"]
        low, high = block[f"{name}_ci95"]
        return f"{hits}/{n} = {block[name]:.2f} (Wilson 95% CI {low:.2f}-{high:.2f})"

    t = spec.thresholds.model_dump()
    chosen = metrics["chosen_on_all_patients"]
    sample = metrics["normal_sample"]
    held, shipped = sample["thresholds_chosen_without_normal002"], sample["shipped_thresholds"]

    def call(block: dict) -> str:
        return (f"{'COVID-19' if block['called_covid'] else 'not COVID-19'} (score "
                f"{block['score']:.3f} vs decision {block['thresholds']['decision']:.3f}; lesion "
                f"{block['lesion_ml']:.1f} mL, {block['involvement_percent']:.2f}% of lung)")

    table = "\n".join([
        row("", "AUC (95% CI, bootstrap)", "sensitivity", "specificity"),
        row("---", "---", "---", "---"),
        row("rule, leave-one-patient-out", f"{fmt(lopo['auc']['auc'], 2)} ({ci(lopo['auc'])})",
             rate(lopo, "sensitivity"), rate(lopo, "specificity")),
        row("burden only (ablation, same lesion maps)",
             f"{fmt(burden['auc'], 2)} ({ci(burden)})", "", ""),
        "",
        row("patient", "label", "slices", "chosen without it (p / mL / decision)", "lesion mL",
             "lesion %", "right / left %", "peripheral", "GGO share", "score", "call"),
        row(*["---"] * 11),
        rows,
    ])
    text = f"""# ct-classifier: COVID-19 vs not per CT series (rule on lesion burden and pattern)

{INTENDED_USE}

A rule, not a trained network (`weights: null`): with {metrics['n_patients']} CT patients in
the shared data a trained classifier would learn the patients. Inputs are the `ct-lung` and
`ct-lesion` label maps. Features: lesion share of lung volume, per-lung share (bilateral),
share of lesion within {t['peripheral_mm']:.0f} mm of the lung border (peripheral), GGO share
of lesion. Score:

    score = ramp(involvement %, {t['burden_low_pct']}, {t['burden_high_pct']})
      * ({t['w_base']}
         + {t['w_bilateral']} * ramp(min(right %, left %), {t['side_low_pct']}, \
{t['side_high_pct']})
         + {t['w_peripheral']} * ramp(peripheral share, {t['peripheral_low']}, \
{t['peripheral_high']})
         + {t['w_ggo']} * ramp(GGO share, {t['ggo_low']}, {t['ggo_high']}))

COVID-19 (SCT 840539006) when score >= **{t['decision']:.3f}**. The ramps were set a priori
from the consensus description of typical COVID-19 CT (bilateral, peripheral, GGO-dominant).
The features are computed on the decision's own lesion mask, built from the lesion network's
probabilities with this spec's `lesion_probability` ({chosen['lesion_probability']}) and
`min_lesion_ml` ({chosen['min_lesion_ml']} mL); the mask the node writes to the SEG and measures
in the SR is a different one, `ct-lesion`'s measurement setting (its card). The decision
threshold and the two decision lesion settings are chosen on the
real HU patients (`training/common/ct_lopo.py`: best balanced accuracy among the lesion settings
that keep every normal chest under 5 mL of lesion, ties to the wider margin, then the stricter
lesion setting); the figures below judge each patient with the three thresholds
chosen **without** it. **The score ranks series; it is not a calibrated probability.**

## Data (evaluation only)
{HU_SOURCES}
COVID-CT-MD: the six whole-chest series (every second slice, 4 mm; P001, P002 COVID-19; cap001,
cap002 community-acquired pneumonia; normal001, normal002), one series per patient; each one's
lesions from the lesion fold model that never trained on it (out of fold:
{'yes' if metrics.get('lesion_models_out_of_fold') else '**no**'}). Also TCIA Lung-PET-CT-Dx
A0001/A0002 and RIDER (lung cancer, partial series). The two COVID-19-NY-SBU single axial
slices are **not** counted: the node refuses to score a one-slice series, so a figure that
counted them described calls it never makes. MedSeg slices and the 7 paper figures were not
used.

## Results (leave-one-patient-out, n = {metrics['n_patients']}, {metrics['n_covid']} COVID)

{table}

![ROC](roc_per_patient.png)

**The normal sample** (`dicom_samples/ct-normal_covid-ct-md-normal002`, 30 slices of normal002):
with the thresholds chosen without normal002 it is called {call(held)}; with the shipped
thresholds (chosen on all patients, normal002's whole series included) {call(shipped)}.

What the evidence supports: {metrics['n_covid']} COVID patients and
{metrics['n_patients'] - metrics['n_covid']} non-COVID patients, all series the node scores,
from few hospitals; the CI shows how little any figure here says (sensitivity over
{metrics['n_covid']} patients moves in steps of {1 / max(metrics['n_covid'], 1):.0%}). The AUC
pools scores from different folds.

## Device
{device_text()}.

## Limits
- Lung cancer, CAP and other pneumonias also cause GGO and consolidation; the rule only
  encodes the pattern typical of COVID-19 (as do radiologists' CO-RADS/RSNA categories) and
  will call other viral or organising pneumonias COVID-19.
- Inherits the errors of `ct-lung` (missed consolidation) and `ct-lesion` (50 outlined slices,
  six weakly labelled chests).
- Partial series (blocks of 1-60 slices) give burden over the block, not over the lungs.
"""
    (out / "card.md").write_text(text)
