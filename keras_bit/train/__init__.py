"""Fine-tuning with BiT-HyperRule: data sources, tf.data pipelines, tf.distribute, the `finetune` job."""
