// A libtorch training loop across sites with strait's C++ API.
//
//   build/examples/cpp/strait_example_cpp CONFIG SITE
//
// Each site runs this program with its own SITE name (examples/cpp/README.md
// shows two sites on one machine). Each fits y = 3x + 1 on its own half of
// the inputs with DiLoCo: 5 local SGD steps, then the compressed
// pseudo-gradients cross the border and every site takes the same outer step.

#include <torch/torch.h>

#include <cstdio>

#include "core/error.h"
#include "torch_ext/strait_torch.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CONFIG SITE\n", argv[0]);
    return 2;
  }
  try {
    strait::torch::Site site(argv[1], argv[2]);
    const bool first = site.index() == 0;
    // This site's data: it never leaves the process.
    const at::Tensor x = at::linspace(first ? -1.0 : 0.0, first ? 0.0 : 1.0, 256).view({256, 1});
    const at::Tensor y = 3 * x + 1 + 0.05 * at::randn({256, 1});

    torch::nn::Linear model(1, 1);
    torch::optim::SGD inner(model->parameters(), 0.1);
    strait::torch::DiLoCo diloco(site, model->parameters(), {5, 0.8, 0.5, true});
    for (int step = 1; step <= 200; ++step) {
      inner.zero_grad();
      auto loss = torch::mse_loss(model->forward(x), y);
      loss.backward();
      inner.step();
      diloco.step();
      if (step % 50 == 0) {
        std::printf("site %s step %d loss %.5f w %.4f b %.4f\n", site.name().c_str(), step, loss.item<float>(),
                    model->weight.item<float>(), model->bias.item<float>());
      }
    }
  } catch (const strait::Error& e) {
    std::fprintf(stderr, "strait: %s\n", e.what());
    return 1;
  }
  return 0;
}
