import torch

from dist_w2v.model.skipgram import SkipGram, masked_bce, skip_gram


def test_seed_loss_example():
    pred = torch.tensor([[1.1, -2.2, 3.3, -4.4]] * 2)
    label = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).float()
    loss = masked_bce(pred, label, mask)
    assert torch.allclose(loss, torch.tensor([0.9352, 1.8462]), atol=1e-4)


def test_seed_skip_gram_shape():
    embed = torch.nn.Embedding(20, 4)
    out = skip_gram(torch.ones((2, 1), dtype=torch.long), torch.ones((2, 4), dtype=torch.long),
                    embed, embed)
    assert out.shape == (2, 1, 4)


def test_model_tables_are_sparse_and_xavier():
    model = SkipGram(50, 8)
    model.reset_parameters(torch.Generator().manual_seed(0))
    bound = (6 / (50 + 8)) ** 0.5
    for table in (model.center, model.context):
        assert table.sparse
        assert table.weight.abs().max() <= bound
    centers = torch.tensor([1, 2])
    cn = torch.tensor([[3, 4, 5, 0], [6, 7, 8, 9]])
    loss = model(centers, cn, torch.tensor([1, 2]), 1)
    loss.mean().backward()
    assert model.center.weight.grad.is_sparse and model.context.weight.grad.is_sparse


def test_forward_matches_manual_per_example_loss():
    torch.manual_seed(0)
    model = SkipGram(30, 6)
    centers = torch.tensor([3, 7])
    cn = torch.tensor([[1, 2, 9, 11, 0, 0], [4, 5, 6, 10, 12, 13]])
    n = torch.tensor([1, 2])  # K=1: row 0 -> 1 context + 1 negative, row 1 -> 2 + 2
    loss = model(centers, cn, n, 1)
    v, u = model.center.weight, model.context.weight
    def bce(x, y):
        return -torch.nn.functional.logsigmoid(x if y else -x)
    row0 = (bce(v[3] @ u[1], 1) + bce(v[3] @ u[2], 0)) / 2
    row1 = (bce(v[7] @ u[4], 1) + bce(v[7] @ u[5], 1) + bce(v[7] @ u[6], 0)
            + bce(v[7] @ u[10], 0)) / 4
    assert torch.allclose(loss, torch.stack([row0, row1]), atol=1e-6)
