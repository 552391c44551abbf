"""Words that name AI-stack concepts, English and Chinese: the explain tool's routing keywords.

A message that names one of these and carries no file, job id or texts to compare is almost
always a concept question, however it is phrased ("eli5 flash attention", "梯度消失咋回事").
The knowledge base's cards add their own titles and aliases when they arrive.
"""

TOPIC_TERMS_EN = (
    # training & adaptation
    "lora", "qlora", "dora", "peft", "adapter", "adapters", "prefix tuning", "prompt tuning", "p-tuning",
    "fine-tuning", "finetuning", "fine tuning", "instruction tuning", "sft", "rlhf", "rlaif", "dpo", "orpo", "kto",
    "grpo", "ppo", "dqn", "reward model", "reinforcement learning", "q-learning", "policy gradient", "actor-critic",
    "distillation", "knowledge distillation", "pruning", "quantization", "quantisation", "int8", "int4", "gptq", "awq",
    "gguf", "bitsandbytes", "nf4", "mixed precision", "bf16", "fp16", "fp8", "gradient checkpointing",
    "gradient accumulation", "gradient descent", "backpropagation", "learning rate", "warmup", "scheduler",
    "adam", "adamw", "optimizer", "weight decay", "dropout", "batch norm", "batchnorm", "layer norm", "layernorm",
    "rmsnorm", "overfitting", "underfitting", "regularization", "early stopping", "vanishing gradient",
    "exploding gradient", "loss function", "cross-entropy", "perplexity", "epoch", "batch size", "curriculum learning",
    "catastrophic forgetting", "zero-shot", "few-shot", "in-context learning", "chain of thought", "chain-of-thought",
    "cot", "reasoning model", "test-time compute", "self-consistency", "data parallel", "fsdp", "deepspeed", "zero",
    "tensor parallel", "pipeline parallel", "model parallel",
    # architectures
    "transformer", "transformers", "attention", "self-attention", "multi-head attention", "cross-attention",
    "flash attention", "flashattention", "pagedattention", "paged attention", "kv cache", "rope", "rotary",
    "positional encoding", "positional embedding", "mixture of experts", "moe", "encoder", "decoder",
    "encoder-decoder", "bert", "gpt", "t5", "cnn", "convolution", "rnn", "lstm", "gru", "gan", "vae", "diffusion",
    "stable diffusion", "u-net", "unet", "resnet", "vit", "vision transformer", "clip", "yolo", "object detection",
    "segmentation", "autoencoder", "state space model", "mamba", "sliding window attention", "grouped-query attention",
    "gqa", "mqa", "multi-query attention", "softmax", "activation function", "relu", "gelu", "swiglu",
    "residual connection", "layer", "neuron", "perceptron", "mlp", "feed-forward",
    # language & retrieval
    "tokenization", "tokenizer", "tokens", "bpe", "byte-pair encoding", "wordpiece", "sentencepiece", "embedding",
    "embeddings", "word2vec", "glove", "vector database", "vector store", "rag", "retrieval-augmented generation",
    "retrieval", "reranker", "reranking", "bm25", "hybrid search", "chunking", "semantic search", "cosine similarity",
    "euclidean distance", "dot product", "nearest neighbor", "ann", "hnsw", "faiss", "chroma", "pinecone",
    "temperature", "top-p", "top-k", "nucleus sampling", "beam search", "greedy decoding", "sampling",
    "speculative decoding", "hallucination", "prompt engineering", "system prompt", "context window",
    "function calling", "tool calling", "agent", "agents", "react agent", "guardrails", "prompt injection",
    "alignment", "constitutional ai", "llm", "slm", "foundation model", "multimodal", "vlm",
    # explainability & classic ml
    "shap", "shapley", "lime", "feature importance", "partial dependence", "explainability", "interpretability",
    "xgboost", "lightgbm", "catboost", "gradient boosting", "random forest", "decision tree", "logistic regression",
    "linear regression", "svm", "k-means", "kmeans", "pca", "t-sne", "umap", "clustering", "classification",
    "regression", "cross-validation", "precision", "recall", "f1", "roc", "auc", "confusion matrix",
    "bias-variance", "feature engineering", "one-hot encoding", "normalization", "standardization",
    "data leakage", "imbalanced data", "smote",
    # serving, tools & models
    "vllm", "ollama", "llama.cpp", "tensorrt", "tensorrt-llm", "onnx", "onnx runtime", "triton", "tgi",
    "continuous batching", "inference", "serving", "throughput", "latency", "mlops", "hugging face",
    "huggingface", "langchain", "langgraph", "llamaindex", "pytorch", "tensorflow", "jax", "keras", "scikit-learn",
    "sklearn", "pandas", "numpy", "dask", "spark", "cuda", "gpu", "tpu", "vram", "flops", "mfu", "nccl",
    "chatgpt", "copilot", "gpt-4", "gpt-4o", "llama", "deepseek", "deepseek-r1", "deepseek-v3", "deepseek-v2",
    "qwen", "mistral", "mixtral", "gemma", "phi", "claude", "openllama", "unsloth", "wandb", "weights & biases",
    "mlflow", "tensorboard", "modelscope", "benchmark", "mmlu", "evaluation", "scaling laws", "emergent abilities",
)

TOPIC_TERMS_ZH = (
    "微调", "全参数微调", "指令微调", "低秩", "适配器", "强化学习", "奖励模型", "人类反馈",
    "知识蒸馏", "蒸馏", "剪枝", "量化", "混合精度", "梯度检查点", "梯度累积", "梯度下降",
    "反向传播", "学习率", "优化器", "权重衰减", "正则化", "过拟合", "欠拟合", "早停",
    "梯度消失", "梯度爆炸", "损失函数", "交叉熵", "困惑度", "灾难性遗忘", "零样本", "少样本",
    "上下文学习", "思维链", "推理模型", "数据并行", "张量并行", "流水线并行", "模型并行", "注意力",
    "注意力机制", "自注意力", "多头注意力", "交叉注意力", "键值缓存", "位置编码", "旋转位置编码", "混合专家",
    "专家混合", "编码器", "解码器", "卷积", "卷积神经网络", "循环神经网络", "长短期记忆", "生成对抗网络",
    "扩散模型", "目标检测", "图像分割", "自编码器", "激活函数", "残差连接", "神经网络", "感知机",
    "前馈网络", "层归一化", "批归一化", "分词", "分词器", "词元", "嵌入", "嵌入向量",
    "词向量", "向量数据库", "检索增强", "检索增强生成", "重排序", "混合检索", "语义检索", "余弦相似度",
    "欧氏距离", "点积", "温度", "束搜索", "采样", "投机解码", "幻觉", "提示词",
    "提示工程", "上下文窗口", "函数调用", "工具调用", "智能体", "提示注入", "对齐", "大模型",
    "大语言模型", "多模态", "停用词", "可解释性", "特征重要性", "梯度提升", "随机森林", "决策树",
    "逻辑回归", "线性回归", "支持向量机", "聚类", "主成分分析", "降维", "分类", "回归",
    "交叉验证", "精确率", "召回率", "混淆矩阵", "特征工程", "独热编码", "归一化", "标准化",
    "数据泄露", "样本不均衡", "推理", "部署", "吞吐量", "延迟", "显存", "算力",
    "模型选择", "评测", "缩放定律", "涌现",
)
TOPIC_TERMS = TOPIC_TERMS_EN + TOPIC_TERMS_ZH
