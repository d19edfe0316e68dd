// The table of conv3x3_act activations (pycnn::registered<ConvActivation>: the ConvRegistrar
// objects of activation.hpp fill it while the extension loads) and the pre-activation rule
// read from it.
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

bool saves_pre(const char* fn, const std::string& activation, double slope, double alpha,
               const py::object& prelu_weight) {
    const ConvActivation& a = conv_activation(fn, activation);
    if (prelu_weight.is_none() == a.per_channel) {
        throw py::value_error(std::string(fn) + (a.per_channel ? ": activation '" + activation +
                                                                     "' needs prelu_weight of shape (K,)"
                                                               : ": prelu_weight must be None unless activation is "
                                                                 "'prelu'"));
    }
    if (prelu_weight.is_none()) return !a.grad_from_output(make_params<double>(slope, alpha));
    const py::array w = as_float_array(fn, "prelu_weight", prelu_weight);
    if (w.ndim() != 1) {
        throw py::value_error(std::string(fn) + ": prelu_weight must have shape (K,), got " + shape_str(w));
    }
    return dispatch_float(w, [&](auto zero) {
        using T = decltype(zero);
        return !a.grad_from_output(make_params<T>(slope, alpha, data_of<T>(w), static_cast<int64_t>(w.size())));
    });
}

void check_saved(const char* fn, const std::string& activation, bool saved_is_pre, double slope, double alpha,
                 const py::object& prelu_weight) {
    if (!saved_is_pre && saves_pre(fn, activation, slope, alpha, prelu_weight)) {
        throw py::value_error(std::string(fn) + ": activation '" + activation +
                              "' with these parameters needs the pre-activation (saved_is_pre=True): "
                              "its gradient can't be read off the output");
    }
}

}  // namespace act
}  // namespace pycnn
