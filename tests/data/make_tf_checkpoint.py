"""Writes tests/data/openai_tf/: a tiny iGPT checkpoint in the layout of OpenAI's released ones
(openai/image-gpt src/model.py variable names and shapes), saved by TensorFlow's own Saver, plus
expected.npz with every tensor's values. test_convert.py reads it with igpt_fast.tf_checkpoint, which
needs no TensorFlow; this script does (run once: pip install tensorflow-cpu; python THIS_FILE).

Shapes: n_vocab 8, n_px 3 (n_ctx 9), n_embd 16, n_head 2, n_layer 2. Variables on two devices, so the
sharded Saver writes two data shards, as OpenAI's 32; Adam slots for model/wte, beta powers and
global_step, as a training checkpoint holds; and a float16, a bfloat16 and an int64 tensor outside
model/ for the reader's dtypes. openai_tf_bert/: the same model/ variables less sos (a BERT-objective
checkpoint), one shard, no optimizer state.
"""
import os
import shutil

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1
tf1.disable_eager_execution()
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openai_tf")
shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)
n_vocab, n_ctx, C, n_head, n_layer = 8, 9, 16, 2, 2
rng = np.random.default_rng(0)
shapes = {"model/wte": (n_vocab, C), "model/wpe": (n_ctx, C), "model/wtet": (n_vocab, C), "model/sos": (C,),
          "model/ln_f/g": (C,)}
for i in range(n_layer):
    p = f"model/h{i}/"
    shapes.update({p + "ln_1/g": (C,), p + "ln_2/g": (C,), p + "mlp/c_fc/w": (C, 4 * C),
                   p + "mlp/c_proj/w": (4 * C, C)})
    for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
        shapes[p + "attn/" + name] = (n_head, C // n_head, C)
values = {}
for name, shape in shapes.items():
    values[name] = ((1 + 0.2 * rng.standard_normal(shape)) if name.endswith("/g")
                    else 0.3 * rng.standard_normal(shape)).astype(np.float32)
values["extra/half"] = rng.standard_normal((3, 5)).astype(np.float16)
bf16 = rng.standard_normal((4, 2)).astype(np.float32)
values["extra/bf16"] = (bf16.view(np.uint32) & 0xFFFF0000).view(np.float32)  # exactly representable
values["extra/i64"] = np.arange(-3, 4, dtype=np.int64) * (1 << 40)



def save_bert(folder):
    """The model/ tensors less sos, saved by a plain (unsharded) Saver."""
    shutil.rmtree(folder, ignore_errors=True)
    with tf1.Graph().as_default() as g:
        variables = [tf1.get_variable(n, initializer=tf.constant(v)) for n, v in values.items()
                     if n.startswith("model/") and n != "model/sos"]
        with tf1.Session(graph=g) as sess:
            sess.run(tf1.global_variables_initializer())
            tf1.train.Saver(variables).save(sess, os.path.join(folder, "model.ckpt"), global_step=7,
                                            write_meta_graph=False)


save_bert(out + "_bert")
graph = tf1.Graph()
with graph.as_default():
    variables = {}
    for j, (name, value) in enumerate(values.items()):
        with tf1.device(f"/cpu:{j % 2}"):
            dtype = tf.bfloat16 if name == "extra/bf16" else tf.as_dtype(value.dtype)
            variables[name] = tf1.get_variable(name, initializer=tf.cast(tf.constant(value), dtype))
    step = tf1.train.get_or_create_global_step()
    loss = tf.reduce_sum(tf.square(variables["model/wte"]))
    tf1.train.AdamOptimizer(1e-3).minimize(loss, var_list=[variables["model/wte"]])
    saver = tf1.train.Saver(sharded=True)
    with tf1.Session(graph=graph, config=tf1.ConfigProto(device_count={"CPU": 2})) as sess:
        sess.run(tf1.global_variables_initializer())
        saver.save(sess, os.path.join(out, "model.ckpt"), global_step=1000)
os.remove(os.path.join(out, "model.ckpt-1000.meta"))  # the graph: not read, 100 kB
for folder in (out, out + "_bert"):
    os.remove(os.path.join(folder, "checkpoint"))  # TF's state file names absolute paths of this machine
np.savez(os.path.join(out, "expected.npz"), **{k.replace("/", "."): v for k, v in values.items()})
print(sorted(os.listdir(out)))
