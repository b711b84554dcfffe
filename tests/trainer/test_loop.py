"""The trainer's epoch loop computes what ``Model.fit`` / ``Model.evaluate`` compute."""

from __future__ import annotations

import numpy as np
import pytest


def _model(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3, seed=seed)(x)
    out = keras.layers.Dense(3, activation="softmax", name="probs")(x)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(name="crossentropy"),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def _dataset(x, y, batch: int):
    import keras

    class DS(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=2, use_multiprocessing=False, max_queue_size=4)

        def __len__(self):
            return -(-len(x) // batch)

        def __getitem__(self, i):  # a short last batch: the loop's function must take any batch size
            return x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]

    return DS()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 8, 8, 3)).astype(np.float32)
    y = (x[:, :4, :4, 0].mean(axis=(1, 2)) > 0).astype(np.int64) + (x[:, 4:, 4:, 1].mean(axis=(1, 2)) > 0.2)
    return x, y


def test_fit_and_evaluate_match_keras(data):
    import keras

    from transfer.trainer import loop

    x, y = data
    seen = {"ours": [], "keras": []}

    class Rec(keras.callbacks.Callback):
        def __init__(self, key):
            super().__init__()
            self.key = key

        def on_epoch_end(self, epoch, logs=None):
            seen[self.key].append((epoch, round(float(logs["loss"]), 5), round(float(logs["accuracy"]), 5)))
            if epoch == 2:
                self.model.stop_training = True  # honoured as Model.fit does

    ours, ref = _model(1), _model(1)
    loop.fit(ours, _dataset(x, y, 16), initial_epoch=1, epochs=6, callbacks=[Rec("ours")])
    ref.fit(_dataset(x, y, 16), initial_epoch=1, epochs=6, callbacks=[Rec("keras")], verbose=0, shuffle=False)
    assert [e for e, *_ in seen["ours"]] == [1, 2]
    assert seen["ours"] == seen["keras"]
    for a, b in zip(ours.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(ours.optimizer.iterations.numpy()) == 2 * 5  # 70 images in batches of 16: 5 steps an epoch

    step = loop.StepFunction(ours, "test_step")
    got = loop.evaluate(step, _dataset(x, y, 32))
    want = ref.evaluate(_dataset(x, y, 32), verbose=0, return_dict=True)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["accuracy"] == pytest.approx(want["accuracy"])
    again = loop.evaluate(step, _dataset(x, y, 7))  # other batch sizes: the same traced function
    assert again["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert step._fn.experimental_get_tracing_count() == 1
