r"""MTT's evaluation training in PyTorch, timed on random data (the reference side of
``experiments.side_by_side --path=eval``).

``--num_eval`` of MTT's own ConvNets (``networks.py`` from ``--mtt_dir``: width 128, instance
norm, average pooling) are trained one after another, as MTT's ``evaluate_synset`` does: SGD
with momentum 0.9 and weight decay 5e-4 at lr 0.01, lr x0.1 at half time, minibatches of 256
drawn from a shuffled synthetic set, cross-entropy, then one pass over 256 test images. No
augmentation (MTT's DSA code is not among the anchors; satm-jax's side then runs with
``--dsa_strategy=none``). This file is ours; only the network comes from MTT. Run it with a
Python that has ``torch`` and ``numpy``::

    python experiments/torch_eval.py --ncls=10 --ipc=10 --res=32 --channels=3 --epochs=100

It prints one line ``torch-eval ... total=<ms>ms`` (the whole evaluation of all networks, after
a one-epoch warm-up).

``--expert`` times MTT's expert training (``buffer.py``) instead: ``--num_eval`` networks
trained one after another for ``--epochs`` epochs on ``--n_train`` images with SGD at lr 0.01,
no momentum, no weight decay and no lr decay, minibatches of 256 from a shuffled set::

    python experiments/torch_eval.py --expert --n_train=5000 --ncls=10 --res=32 --epochs=1 \
        --num_eval=1
"""

import argparse
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ncls", type=int, default=10)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--num_eval", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--expert", action="store_true", help="MTT's expert training instead")
    ap.add_argument("--n_train", type=int, default=5000, help="training images for --expert")
    ap.add_argument(
        "--mtt_dir",
        default=os.path.join(
            os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
            "shared",
            "anchors",
            "mtt",
        ),
    )
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.mtt_dir, "networks.py")):
        print(f"MTT's networks.py is not in {a.mtt_dir} (--mtt_dir)", file=sys.stderr)
        return 2
    sys.path.insert(0, a.mtt_dir)
    import torch
    import torch.nn as nn
    from networks import ConvNet  # MTT's own

    torch.manual_seed(0)
    n = a.n_train if a.expert else a.ncls * a.ipc
    x = torch.randn(n, a.channels, a.res, a.res)
    y = torch.arange(n) % a.ncls if a.expert else torch.arange(a.ncls).repeat_interleave(a.ipc)
    # MTT's buffer.py (experts): plain SGD; evaluate_synset: momentum, decay, lr x0.1 at half
    momentum, weight_decay, decay = (0.0, 0.0, False) if a.expert else (0.9, 5e-4, True)
    xt = torch.randn(256, a.channels, a.res, a.res)
    yt = torch.randint(0, a.ncls, (256,))
    ce = nn.CrossEntropyLoss()

    def train_one(epochs: int) -> float:
        net = ConvNet(
            channel=a.channels,
            num_classes=a.ncls,
            net_width=a.width,
            net_depth=a.depth,
            net_act="relu",
            net_norm="instancenorm",
            net_pooling="avgpooling",
            im_size=(a.res, a.res),
        )
        opt = torch.optim.SGD(
            net.parameters(), lr=0.01, momentum=momentum, weight_decay=weight_decay
        )
        net.train()
        for ep in range(epochs):
            if decay and ep == epochs // 2:
                for g in opt.param_groups:
                    g["lr"] *= 0.1
            perm = torch.randperm(n)
            for i in range(0, n, a.batch):
                idx = perm[i : i + a.batch]
                loss = ce(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            return float((net(xt).argmax(1) == yt).float().mean())

    train_one(1)  # warm-up (allocator, first-call overheads)
    t0 = time.perf_counter()
    for _ in range(a.num_eval):
        train_one(a.epochs)
    total = time.perf_counter() - t0
    print(
        f"torch-eval {'expert' if a.expert else 'eval'} n={n} ncls={a.ncls} ipc={a.ipc} res={a.res} channels={a.channels} "
        f"epochs={a.epochs} num_eval={a.num_eval} threads={torch.get_num_threads()} "
        f"total={1000 * total:.1f}ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
