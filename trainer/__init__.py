"""Fine-tuning and evaluation of the chat model on the splits written by dataset_tools."""
