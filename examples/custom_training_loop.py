"""Train a small network on scikit-learn's digits with the fused loss inside a
tf.function + GradientTape loop, and print its accuracy.

    python examples/custom_training_loop.py [--epochs 30] [--label-smoothing 0.1]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fused_xent


def load_data(seed):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return train_test_split(x, digits.target.astype(np.int32), test_size=0.25, random_state=seed)


def build_model(seed):
    tf.random.set_seed(seed)
    return tf.keras.Sequential(
        [tf.keras.Input([64]), tf.keras.layers.Dense(128, activation="relu"), tf.keras.layers.Dense(10)]
    )


def train(args):
    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = build_model(args.seed)
    optimizer = tf.keras.optimizers.Adam(args.learning_rate)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(
                fused_xent.sparse_softmax_cross_entropy_with_logits(y, logits, label_smoothing=args.label_smoothing)
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def accuracy(x, y):
        predictions = tf.argmax(model(x, training=False), axis=-1, output_type=tf.int32)
        return tf.reduce_mean(tf.cast(predictions == y, tf.float32))

    dataset = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(2048, seed=args.seed).batch(args.batch_size)
    )
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        losses = [train_step(x, y) for x, y in dataset]
        if epoch == 1 or epoch % 10 == 0 or epoch == args.epochs:
            print(f"epoch {epoch:3d}  loss {np.mean(losses):.4f}  test accuracy {accuracy(x_test, y_test):.4f}")
    elapsed = time.perf_counter() - start
    final = float(accuracy(x_test, y_test))
    print(f"final test accuracy {final:.4f} after {args.epochs} epochs ({elapsed:.1f} s)")
    return final


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
