"""DeepCTR-Torch's way, raw Criteo file to a trained DeepFM, timed end to end (run by
bench/e2e_deepctr.sh in its own venv, next to the same job done by `mlfast train`).

Its setup follows DeepCTR-Torch's own Criteo example: pandas reads the file, missing categoricals
are filled with "-1" and integers with 0, LabelEncoder per categorical, MinMaxScaler on the
integers, SparseFeat / DenseFeat columns, DeepFM; the model options match mlfast's DeepFM (embedding
dim 16, MLP 400-400-400 with BatchNorm and dropout 0.2, Adam lr 1e-3, batch 4096, 1 epoch) and both
train on the first 80% of the rows and validate on the next 10% (the same rows as mlfast).

    python bench/e2e_deepctr.py DATA.tsv --json out.json
"""
import argparse
import json
import time

T0 = time.perf_counter()

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.preprocessing import LabelEncoder, MinMaxScaler  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--json")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4096)
    a = ap.parse_args()
    from deepctr_torch.inputs import DenseFeat, SparseFeat, get_feature_names
    from deepctr_torch.models import DeepFM

    t_import = time.perf_counter() - T0
    dense = [f"I{i}" for i in range(1, 14)]
    sparse = [f"C{i}" for i in range(1, 27)]
    t = time.perf_counter()
    data = pd.read_csv(a.data, sep="\t", header=None, names=["label"] + dense + sparse)
    data[sparse] = data[sparse].fillna("-1")
    data[dense] = data[dense].fillna(0)
    for feat in sparse:
        data[feat] = LabelEncoder().fit_transform(data[feat])
    data[dense] = MinMaxScaler(feature_range=(0, 1)).fit_transform(data[dense])
    cols = [SparseFeat(f, vocabulary_size=data[f].nunique(), embedding_dim=16) for f in sparse] + \
           [DenseFeat(f, 1) for f in dense]
    names = get_feature_names(cols)
    n = len(data)  # rows [0, 80%) train, [80%, 90%) validate: mlfast gets the same files (e2e_deepctr.sh)
    train, valid = data.iloc[: n * 8 // 10], data.iloc[n * 8 // 10: n * 9 // 10]
    t_prep = time.perf_counter() - t
    t = time.perf_counter()
    model = DeepFM(cols, cols, task="binary", dnn_hidden_units=(400, 400, 400), dnn_dropout=0.2, dnn_use_bn=True,
                   device="cpu")
    model.compile(torch.optim.Adam(model.parameters(), lr=1e-3), "binary_crossentropy")
    model.fit({n: train[n] for n in names}, train["label"].values, batch_size=a.batch_size, epochs=a.epochs,
              verbose=0)
    t_train = time.perf_counter() - t
    auc = roc_auc_score(valid["label"].values, model.predict({n: valid[n] for n in names}, 16384))
    out = {"tool": "deepctr-torch", "rows": len(data), "import_s": t_import, "read_encode_s": t_prep,
           "train_s": t_train, "total_s": time.perf_counter() - T0, "train_samples_per_s": len(train) * a.epochs / t_train,
           "valid_auc": auc, "threads": torch.get_num_threads()}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
