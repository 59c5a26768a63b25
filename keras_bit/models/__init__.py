"""BiT architectures (`resnet_v2`) and the models with weights built from them (`bit`)."""
