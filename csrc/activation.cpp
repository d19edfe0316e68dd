// The table of conv3x3_act activations (pycnn::registered<ConvActivation>: the ConvRegistrar
// objects of activation.hpp fill it while the extension loads) and the look-up by name.
#include "activation.hpp"

#include <algorithm>
#include <string>
#include <vector>

namespace pycnn {
namespace act {

void add_conv_activation(ConvActivation a) {
    auto& t = registered<ConvActivation>();
    t.push_back(std::move(a));
    std::sort(t.begin(), t.end(), [](const ConvActivation& x, const ConvActivation& y) { return x.name < y.name; });
}

const ConvActivation& conv_activation(const char* fn, const std::string& name) {
    std::string known;
    for (const ConvActivation& a : registered<ConvActivation>()) {
        if (a.name == name) return a;
        known += (known.empty() ? "'" : ", '") + a.name + "'";
    }
    throw py::value_error(std::string(fn) + ": activation must be one of " + known + ", got '" + name + "'");
}

}  // namespace act
}  // namespace pycnn
