"""curves.png: the panels a run's metrics call for."""

from PIL import Image

from satm_jax import outputs


class _Cfg:
    name = "toy"


def _write(rundir, sharp: bool):
    w = outputs.MetricsWriter(str(rundir), tensorboard=False)
    for it in range(1, 21):
        m = {"loss": 1.0 / it, "syn_lr": 0.01, "img_update_rel": 0.01, "grad_norm": 0.1}
        m.update(img_norm=10.0, update_norm=0.1)
        if sharp:
            m.update(eps_norm=0.05, sharpness=0.005, perturbed_loss=1.0 / it + 0.005)
        w.iteration(it, m)
    w.close()


def test_a_sharpness_aware_run_gets_the_sharpness_and_norm_panels(tmp_path):
    (tmp_path / "mtt").mkdir()
    (tmp_path / "satm").mkdir()
    _write(tmp_path / "mtt", sharp=False)
    _write(tmp_path / "satm", sharp=True)
    with Image.open(outputs.plot_run(str(tmp_path / "mtt"), _Cfg)) as im:
        h_mtt = im.size[1]
    with Image.open(outputs.plot_run(str(tmp_path / "satm"), _Cfg)) as im:
        h_satm = im.size[1]
    # 2 inches per panel below the first: MTT has step size, update and norms (4 panels),
    # SATM also the sharpness panel (5).
    dpi = h_mtt / (3 + 2 * 3)
    assert h_satm == round(dpi * (3 + 2 * 4))
