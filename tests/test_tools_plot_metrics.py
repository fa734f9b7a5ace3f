"""tools.plot_metrics on two stages' metrics.jsonl: one axis, stage 2 shifted by stage 1's tokens, a line per run
for training loss and lr, a line per run and held-out set for loss and (where logged) bits per character, and a PNG
that decodes."""
import json

from tools.plot_metrics import draw, main, read_run


def write_run(folder, tokens_per_step, eval_sets, steps=4, resumed_duplicate=False, bits=True):
    lines = []
    for step in range(0, steps + 1):
        tokens = step * tokens_per_step
        if step:
            lines.append({"step": step, "tokens_seen": tokens, "loss": 5.0 - 0.1 * step, "lr": 1e-3 / step,
                          "grad_norm": 1.0})
        if step % 2 == 0:
            lines.append({"step": step, "tokens_seen": tokens, "eval": {
                "sets": {name: {"loss": 6.0 - 0.2 * step - k, "ppl": 1.0, "tokens": 10,
                                **({"bits_per_char": 3.0 - 0.1 * step - k} if bits else {})}
                         for k, name in enumerate(eval_sets)}, "seconds": 0.1}})
    if resumed_duplicate:  # a resumed run logs step 2 again: the later record wins
        lines.append({"step": 2, "tokens_seen": 2 * tokens_per_step, "loss": 9.0, "lr": 5e-4, "grad_norm": 1.0})
    (folder / "logs").mkdir(parents=True)
    (folder / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_two_stages_share_one_axis_with_a_line_per_run_and_set(tmp_path):
    # stage 1 logged before bits per character were: its sets have no line on that panel
    first = write_run(tmp_path / "pretrain", 1000, ["zh", "en"], resumed_duplicate=True, bits=False)
    second = write_run(tmp_path / "task_instruct_tuning", 500, ["zh", "en", "zh-qa-short"])
    runs = [read_run(first), read_run(second / "logs")]
    assert [run.name for run in runs] == ["pretrain", "task_instruct_tuning"]
    assert [r["loss"] for r in runs[0].train][1] == 9.0

    fig = draw(runs)
    loss_ax, eval_ax, bits_ax, lr_ax = fig.axes
    assert len(loss_ax.lines) == 2 and len(lr_ax.lines) == 2
    assert len(eval_ax.lines) == 2 + 3
    assert len(bits_ax.lines) == 3
    assert list(bits_ax.lines[0].get_xdata()) == [4000, 5000, 6000]
    assert list(bits_ax.lines[0].get_ydata()) == [3.0, 2.8, 2.6]
    assert bits_ax.lines[0].get_color() == eval_ax.lines[2].get_color()  # zh, one colour on both panels
    assert [t.get_text() for t in eval_ax.get_legend().get_texts()] == ["zh", "en", "zh-qa-short"]
    # Stage 2 starts where stage 1 ends (4,000 tokens): its step-0 evaluation sits there, its step 1 at 4,500.
    assert list(eval_ax.lines[2].get_xdata()) == [4000, 5000, 6000]
    assert list(loss_ax.lines[1].get_xdata()) == [4500, 5000, 5500, 6000]
    # A set keeps its colour from stage to stage.
    assert eval_ax.lines[0].get_color() == eval_ax.lines[2].get_color()
    assert lr_ax.get_xlabel() == "tokens seen (stages one after another)"

    out = tmp_path / "plots" / "curves.png"
    assert main([str(first), str(second), "--out", str(out)]) == 0
    import matplotlib.image

    pixels = matplotlib.image.imread(out)
    assert pixels.shape[:2] == (1000, 1000) and pixels.std() > 0.05  # 10 x 10 inches at 100 dpi, not blank


def test_a_missing_log_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), "--out", str(tmp_path / "c.png")]) == 1
    assert capsys.readouterr().err.strip() == f"plot_metrics: {tmp_path / 'nothing'}: no metrics.jsonl there " \
                                              f"(nor in {tmp_path / 'nothing' / 'logs'})"
